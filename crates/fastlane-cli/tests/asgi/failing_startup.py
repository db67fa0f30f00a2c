from contextlib import asynccontextmanager

from fastapi import FastAPI


@asynccontextmanager
async def lifespan(app):
    raise RuntimeError("the database is not reachable (on purpose)")
    yield


app = FastAPI(lifespan=lifespan)
