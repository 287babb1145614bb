//! Answers as SSE streams: one response alone, for a client that accepts nothing
//! else, or a `tools/call` with `notifications/progress` every few seconds while
//! the sandbox runs, then the response. Clients that reset their
//! request timeout on progress (the TypeScript SDK's `resetTimeoutOnProgress`,
//! the Inspector) then wait for a tool as long as it runs, not their 60 s default;
//! the notifications also keep idle-timeout proxies from cutting the stream.
//!
//! The stream owns the call: a client that closes it drops the call's future,
//! and the pipeline finishes the run on its own and audits it as `abandoned`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use axum::http::HeaderValue;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::Serialize;
use serde_json::Value;
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::RpcResponse;

/// Time between progress notifications: short enough for a client with a
/// request timeout of a few seconds to reset it, long enough to cost nothing.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// The progress token of a request (`params._meta.progressToken`): a string or
/// an integer (a boolean is neither, though JSON libraries may read `true` as 1).
pub fn progress_token(params: &Value) -> Option<Value> {
    params
        .get("_meta")?
        .get("progressToken")
        .filter(|t| t.is_string() || t.is_i64() || t.is_u64())
        .cloned()
}

#[derive(Serialize)]
struct Notification<'a> {
    jsonrpc: &'static str,
    method: &'static str,
    params: ProgressParams<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ProgressParams<'a> {
    progress_token: &'a Value,
    /// Seconds the call has run: it increases with every notification, as the
    /// specification requires; there is no total (a tool's run time is unknown).
    progress: u64,
    message: String,
}

enum State<F> {
    Running {
        answer: Pin<Box<F>>,
        ticker: Interval,
        token: Value,
    },
    Done,
}

/// One response as a stream of one `message` event, then the end.
pub fn single(answer: &RpcResponse) -> Response {
    sse(futures::stream::once(std::future::ready(message(answer))))
}

/// Streams progress for `token` until `answer` is ready, then the answer, then the end.
pub fn with_progress<F>(token: Value, answer: F) -> Response
where
    F: Future<Output = RpcResponse> + Send + 'static,
{
    let started = Instant::now();
    let mut ticker = tokio::time::interval_at(started + PROGRESS_EVERY, PROGRESS_EVERY);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let first = State::Running {
        answer: Box::pin(answer),
        ticker,
        token,
    };
    let events = futures::stream::unfold(first, move |state| async move {
        let State::Running {
            mut answer,
            mut ticker,
            token,
        } = state
        else {
            return None;
        };
        tokio::select! {
            // The answer first: a call that is done is not reported as running.
            biased;
            response = &mut answer => Some((message(&response), State::Done)),
            _ = ticker.tick() => {
                let ran = started.elapsed().as_secs();
                let notification = Notification {
                    jsonrpc: "2.0",
                    method: "notifications/progress",
                    params: ProgressParams {
                        progress_token: &token,
                        progress: ran,
                        message: format!("running in its sandbox for {ran} s"),
                    },
                };
                let event = message(&notification);
                Some((event, State::Running { answer, ticker, token }))
            }
        }
    });
    sse(events)
}

fn sse(events: impl Stream<Item = Result<Event, Infallible>> + Send + 'static) -> Response {
    let mut response = Sse::new(events).into_response();
    // Proxies such as nginx must pass each event on as it comes (the transport's advice).
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// One JSON-RPC message as an SSE `message` event (serde_json writes no newlines).
fn message(body: &impl Serialize) -> Result<Event, Infallible> {
    let data = serde_json::to_string(body).expect("a message always serializes");
    Ok(Event::default().event("message").data(data))
}
