//! What fastlane's own types say about an operation: the parameters and body
//! its extractors read, the `4xx` answers they give before the handler runs,
//! the [`ApiError`] body, and plain `fn` handlers on the lanes.

use aide::generate::GenContext;
use aide::openapi::{MediaType, Operation, Response, SchemaObject};
use aide::operation::OperationHandler;
use aide::{OperationInput, OperationOutput};
use schemars::JsonSchema;

use crate::extract::{Json, Path, Query};
use crate::lane::LaneHandler;
use crate::{ApiError, Background, ClientInfo, RequestId};

/// The body an [`ApiError`] writes, whose schema the document shows.
pub(super) type ErrorBody = crate::api_error::Body<'static>;

/// A response with an [`ApiError`] body and `description`.
pub(super) fn error_response(ctx: &mut GenContext, description: &str) -> Response {
    let mut response = Response { description: description.to_owned(), ..Default::default() };
    response.content.insert(
        "application/json".to_owned(),
        MediaType {
            schema: Some(SchemaObject {
                json_schema: ctx.schema.subschema_for::<ErrorBody>(),
                example: None,
                external_docs: None,
            }),
            ..Default::default()
        },
    );
    response
}

const QUERY_422: &str = "A query value is missing, does not parse or is not acceptable; `field` names it.";
const PATH_422: &str = "A path segment does not parse as its parameter; `field` names it.";
const JSON_422: &str =
    "The JSON body does not fit: a field is missing or has the wrong type; `field` names it.";
const JSON_400: &str = "The body is not valid JSON.";
const JSON_415: &str = "The request's `Content-Type` is not `application/json`.";

impl<T: JsonSchema> OperationInput for Query<T> {
    fn operation_input(ctx: &mut GenContext, operation: &mut Operation) {
        <axum::extract::Query<T> as OperationInput>::operation_input(ctx, operation);
    }

    fn inferred_early_responses(ctx: &mut GenContext, _: &mut Operation) -> Vec<(Option<u16>, Response)> {
        vec![(Some(422), error_response(ctx, QUERY_422))]
    }
}

impl<T: JsonSchema> OperationInput for Path<T> {
    fn operation_input(ctx: &mut GenContext, operation: &mut Operation) {
        <axum::extract::Path<T> as OperationInput>::operation_input(ctx, operation);
    }

    fn inferred_early_responses(ctx: &mut GenContext, _: &mut Operation) -> Vec<(Option<u16>, Response)> {
        vec![(Some(422), error_response(ctx, PATH_422))]
    }
}

impl<T: JsonSchema> OperationInput for Json<T> {
    fn operation_input(ctx: &mut GenContext, operation: &mut Operation) {
        <axum::Json<T> as OperationInput>::operation_input(ctx, operation);
    }

    fn inferred_early_responses(ctx: &mut GenContext, _: &mut Operation) -> Vec<(Option<u16>, Response)> {
        vec![
            (Some(400), error_response(ctx, JSON_400)),
            (Some(415), error_response(ctx, JSON_415)),
            (Some(422), error_response(ctx, JSON_422)),
        ]
    }
}

impl<T: JsonSchema> OperationOutput for Json<T> {
    type Inner = T;

    fn operation_response(ctx: &mut GenContext, operation: &mut Operation) -> Option<Response> {
        <axum::Json<T> as OperationOutput>::operation_response(ctx, operation)
    }

    fn inferred_responses(ctx: &mut GenContext, operation: &mut Operation) -> Vec<(Option<u16>, Response)> {
        <axum::Json<T> as OperationOutput>::inferred_responses(ctx, operation)
    }
}

/// A handler's own errors: their status depends on the handler, so they are
/// the operation's `default` response.
impl OperationOutput for ApiError {
    type Inner = Self;

    fn operation_response(ctx: &mut GenContext, _: &mut Operation) -> Option<Response> {
        Some(error_response(ctx, "An error of the handler's; `error` says what was wrong."))
    }

    fn inferred_responses(ctx: &mut GenContext, operation: &mut Operation) -> Vec<(Option<u16>, Response)> {
        Self::operation_response(ctx, operation).map(|r| (None, r)).into_iter().collect()
    }
}

// Extractors that read nothing the client sends on purpose.
impl OperationInput for Background {}
impl OperationInput for RequestId {}
impl OperationInput for ClientInfo {}

impl<F, Res> OperationHandler<(), Res> for LaneHandler<F>
where
    F: FnOnce() -> Res,
    Res: OperationOutput,
{
}

/// A plain `fn` on a lane documents as the `async fn` it stands for: its
/// arguments are the extractors, its return type the response.
macro_rules! lane_operation_handler {
    ($($ty:ident),+) => {
        impl<F, Res, $($ty,)+> OperationHandler<($($ty,)+), Res> for LaneHandler<F>
        where
            F: FnOnce($($ty,)+) -> Res,
            Res: OperationOutput,
            $($ty: OperationInput,)+
        {
        }
    };
}

lane_operation_handler!(T1);
lane_operation_handler!(T1, T2);
lane_operation_handler!(T1, T2, T3);
lane_operation_handler!(T1, T2, T3, T4);
lane_operation_handler!(T1, T2, T3, T4, T5);
lane_operation_handler!(T1, T2, T3, T4, T5, T6);
lane_operation_handler!(T1, T2, T3, T4, T5, T6, T7);
lane_operation_handler!(T1, T2, T3, T4, T5, T6, T7, T8);
lane_operation_handler!(T1, T2, T3, T4, T5, T6, T7, T8, T9);
lane_operation_handler!(T1, T2, T3, T4, T5, T6, T7, T8, T9, T10);
lane_operation_handler!(T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11);
lane_operation_handler!(T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12);
lane_operation_handler!(T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12, T13);
lane_operation_handler!(T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12, T13, T14);
lane_operation_handler!(T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12, T13, T14, T15);
lane_operation_handler!(T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12, T13, T14, T15, T16);
