//! The JSON messages carried inside two-part frames (runtime spec §1.4–1.5): the request envelope's
//! control header, and the call-home response stream's handshake, prologue, data wrapper and control
//! messages.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How the request reached the worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestType {
    /// One request.
    SingleIn,
    /// A request stream.
    ManyIn,
}

/// What the requester expects back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseType {
    /// One response.
    SingleOut,
    /// A response stream.
    ManyOut,
}

/// Where the worker sends the response: `info` is itself a JSON string.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    /// `tcp_server` for the classic call-home stream.
    pub transport: String,
    /// JSON of [`TcpStreamConnectionInfo`] for `tcp_server`.
    pub info: String,
}

/// The requester's pending response stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpStreamConnectionInfo {
    /// `host:port` of the requester's stream server.
    pub address: String,
    /// Unique id of the pending stream.
    pub subject: String,
    /// The request's context id (must equal the control message's `id`).
    pub context: String,
    /// `response` (or `request` for `many_in`).
    pub stream_type: StreamType,
}

/// Which direction a call-home stream carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamType {
    /// Worker → requester responses.
    Response,
    /// Requester → worker request stream.
    Request,
}

/// The header of a request envelope.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestControlMessage {
    /// The request (context) id.
    pub id: String,
    /// `single_in` | `many_in`.
    pub request_type: RequestType,
    /// `single_out` | `many_out`.
    pub response_type: ResponseType,
    /// Where the response goes.
    pub connection_info: ConnectionInfo,
    /// `json` (default when absent) or `msgpack`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_codec: Option<String>,
    /// Free-form metadata (omitted when empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Map<String, Value>>,
    /// When the frontend sent it (ns since the epoch), for transit-latency metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frontend_send_ts_ns: Option<u64>,
}

/// First frame on a call-home connection (header-only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallHomeHandshake {
    /// The pending stream it answers.
    pub subject: String,
    /// `response`.
    pub stream_type: StreamType,
}

/// Second frame (header-only): whether the worker took the request. A worker that fails a
/// request reports it as an error item on the stream instead (a Dynamo frontend takes a prologue
/// error for a dead worker). Data frames carry stream items.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseStreamPrologue {
    /// `null` when generation started, else the error text.
    pub error: Option<String>,
}

/// Control frames (header-only): requester → worker `stop` / `kill`, worker → requester `sentinel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlMessage {
    /// Stop generating gracefully.
    Stop,
    /// Stop now.
    Kill,
    /// The stream closed normally.
    Sentinel,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wire_forms_match_upstream() {
        assert_eq!(
            serde_json::to_value(ControlMessage::Sentinel).unwrap(),
            json!("sentinel")
        );
        assert_eq!(
            serde_json::from_value::<ControlMessage>(json!("kill")).unwrap(),
            ControlMessage::Kill
        );
        let info = TcpStreamConnectionInfo {
            address: "10.0.0.1:4000".into(),
            subject: "s-1".into(),
            context: "req-1".into(),
            stream_type: StreamType::Response,
        };
        let control = RequestControlMessage {
            id: "req-1".into(),
            request_type: RequestType::SingleIn,
            response_type: ResponseType::ManyOut,
            connection_info: ConnectionInfo {
                transport: "tcp_server".into(),
                info: serde_json::to_string(&info).unwrap(),
            },
            payload_codec: None,
            metadata: None,
            frontend_send_ts_ns: None,
        };
        let value = serde_json::to_value(&control).unwrap();
        assert_eq!(value["request_type"], "single_in");
        assert_eq!(value["response_type"], "many_out");
        assert!(value.get("payload_codec").is_none(), "absent, not null");
        let inner: TcpStreamConnectionInfo =
            serde_json::from_str(value["connection_info"]["info"].as_str().unwrap()).unwrap();
        assert_eq!(inner, info);
        assert_eq!(
            serde_json::to_value(ResponseStreamPrologue { error: None }).unwrap(),
            json!({"error": null})
        );
    }
}
