"""An echo with no middleware: the request body streams in while the response streams out.

(Starlette's BaseHTTPMiddleware, which `app.py` uses, can cut such a body short under any server;
uvicorn loses more of it than fastlane there. This app shows the server's own part.)"""

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

app = FastAPI()


@app.post("/echo")
async def echo(request: Request):
    async def back():
        async for chunk in request.stream():
            yield chunk

    return StreamingResponse(back(), media_type="application/octet-stream")
