//! The GMS message catalogue (runtime spec §2.3): msgpack maps tagged by `"type"`, fields by name.
//!
//! Requests and responses are two closed enums. Decoding goes in two steps so that a client gets the
//! answer Dynamo gives: first the `type` tag alone (an unknown tag is `Unknown request: {Type}`), then the
//! whole message (a known tag with bad fields names the message and the field).

use serde::{Deserialize, Serialize};

/// Lock a client asks for in its handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestedLockType {
    /// Writer: exclusive, wipes the layout on connect.
    #[serde(rename = "rw")]
    Rw,
    /// Reader: shared, only after a commit.
    #[serde(rename = "ro")]
    Ro,
    /// Writer if nothing is committed and the lock is free, otherwise reader (`RW_OR_RO`).
    #[serde(rename = "auto", alias = "rw_or_ro")]
    Auto,
}

/// Lock the server granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GrantedLockType {
    /// Writer.
    #[serde(rename = "rw")]
    Rw,
    /// Reader.
    #[serde(rename = "ro")]
    Ro,
    /// Writer adopting a sealed layout (newer servers; never granted by this one, decoded for peers).
    #[serde(rename = "rw_data")]
    RwData,
}

impl GrantedLockType {
    /// The wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            GrantedLockType::Rw => "rw",
            GrantedLockType::Ro => "ro",
            GrantedLockType::RwData => "rw_data",
        }
    }
}

/// One allocation as the server describes it (`get_allocation_response`, also the list element).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "get_allocation_response")]
pub struct AllocationInfo {
    /// Server-assigned id (a UUID string).
    pub allocation_id: String,
    /// Size as requested.
    pub size: u64,
    /// Size rounded up to the allocation granularity.
    pub aligned_size: u64,
    /// Free-form tag given at allocation.
    pub tag: String,
    /// Position in the layout (ordering and hashing).
    pub layout_slot: u64,
}

/// One runtime event (`get_event_history_response` element; an untagged struct).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeEvent {
    /// `rw_connected`, `rw_aborted`, `allocations_cleared`, `committed`, `allocation_oom`, ...
    pub kind: String,
    /// Allocations affected (for `allocations_cleared`).
    #[serde(default)]
    pub allocation_count: u64,
}

/// Everything a client may send.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// First message of a lock session.
    HandshakeRequest {
        lock_type: RequestedLockType,
        #[serde(default)]
        timeout_ms: Option<u64>,
        #[serde(default)]
        profile_session_id: Option<String>,
    },
    /// Publish the layout (RW); the server replies, then closes the connection.
    CommitRequest {},
    /// Lock state snapshot.
    GetLockStateRequest {},
    /// Number of server-owned allocations.
    GetAllocationStateRequest {},
    /// Create an allocation (RW).
    AllocateRequest {
        size: i64,
        #[serde(default = "default_tag")]
        tag: String,
    },
    /// Export an allocation as a file descriptor (sent with SCM_RIGHTS).
    #[serde(alias = "ExportRequest")]
    ExportAllocationRequest { allocation_id: String },
    /// Describe one allocation.
    GetAllocationRequest { allocation_id: String },
    /// Describe all allocations, optionally with one tag.
    ListAllocationsRequest {
        #[serde(default)]
        tag: Option<String>,
    },
    /// Release an allocation (RW).
    #[serde(alias = "FreeRequest")]
    FreeAllocationRequest { allocation_id: String },
    /// Store a metadata entry (RW).
    MetadataPutRequest {
        key: String,
        allocation_id: String,
        offset_bytes: i64,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Read a metadata entry.
    MetadataGetRequest { key: String },
    /// Remove a metadata entry (RW).
    MetadataDeleteRequest { key: String },
    /// Sorted metadata keys with a prefix.
    MetadataListRequest {
        #[serde(default)]
        prefix: String,
    },
    /// The layout hash of the last commit ("" if none).
    GetMemoryLayoutHashRequest {},
    /// Probe: lock state plus allocation count and hash.
    GetRuntimeStateRequest {},
    /// Probe: the runtime event ring buffer.
    GetEventHistoryRequest {},
    /// Older servers: free everything (RW).
    #[serde(rename = "ClearAllRequest")]
    ClearAllRequest {},
}

fn default_tag() -> String {
    "default".into()
}

/// Every request tag this server understands (older aliases included).
pub const REQUEST_TAGS: &[&str] = &[
    "handshake_request",
    "commit_request",
    "get_lock_state_request",
    "get_allocation_state_request",
    "allocate_request",
    "export_allocation_request",
    "ExportRequest",
    "get_allocation_request",
    "list_allocations_request",
    "free_allocation_request",
    "FreeRequest",
    "metadata_put_request",
    "metadata_get_request",
    "metadata_delete_request",
    "metadata_list_request",
    "get_memory_layout_hash_request",
    "get_runtime_state_request",
    "get_event_history_request",
    "ClearAllRequest",
];

/// Everything the server may send.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    HandshakeResponse {
        success: bool,
        committed: bool,
        #[serde(default)]
        granted_lock_type: Option<GrantedLockType>,
    },
    CommitResponse {
        success: bool,
    },
    GetLockStateResponse {
        state: String,
        has_rw_session: bool,
        ro_session_count: u64,
        waiting_writers: u64,
        committed: bool,
        is_ready: bool,
        #[serde(default)]
        layout_committed: bool,
    },
    GetAllocationStateResponse {
        allocation_count: u64,
    },
    AllocateResponse {
        allocation_id: String,
        size: u64,
        aligned_size: u64,
        layout_slot: u64,
    },
    ExportAllocationResponse {
        allocation_id: String,
        size: u64,
        aligned_size: u64,
        tag: String,
        layout_slot: u64,
    },
    GetAllocationResponse {
        allocation_id: String,
        size: u64,
        aligned_size: u64,
        tag: String,
        layout_slot: u64,
    },
    ListAllocationsResponse {
        #[serde(default)]
        allocations: Vec<AllocationInfo>,
    },
    FreeAllocationResponse {
        success: bool,
    },
    MetadataPutResponse {
        success: bool,
    },
    MetadataGetResponse {
        found: bool,
        #[serde(default)]
        allocation_id: Option<String>,
        #[serde(default)]
        offset_bytes: Option<u64>,
        #[serde(default, with = "serde_bytes")]
        value: Option<Vec<u8>>,
    },
    MetadataDeleteResponse {
        deleted: bool,
    },
    MetadataListResponse {
        #[serde(default)]
        keys: Vec<String>,
    },
    GetMemoryLayoutHashResponse {
        memory_layout_hash: String,
    },
    GetRuntimeStateResponse {
        state: String,
        has_rw_session: bool,
        ro_session_count: u64,
        waiting_writers: u64,
        committed: bool,
        is_ready: bool,
        #[serde(default)]
        allocation_count: u64,
        #[serde(default)]
        memory_layout_hash: String,
        #[serde(default)]
        layout_committed: bool,
    },
    GetEventHistoryResponse {
        #[serde(default)]
        events: Vec<RuntimeEvent>,
    },
    ErrorResponse {
        error: String,
        #[serde(default)]
        code: i64,
    },
    #[serde(rename = "ClearAllResponse")]
    ClearAllResponse {
        cleared_count: u64,
    },
}

/// `error_response.code` of a request the service failed on (it panicked): the session is closed
/// and the service goes on with its tables, so the client may open a new session and try again.
/// Dynamo's server always sends 0; its clients read only `error`.
pub const CODE_SERVICE_FAILED: i64 = 503;

impl Response {
    /// `error_response{error, code: CODE_SERVICE_FAILED}`.
    pub fn service_failed(message: impl Into<String>) -> Self {
        Response::ErrorResponse {
            error: message.into(),
            code: CODE_SERVICE_FAILED,
        }
    }

    /// `error_response{error, code: 0}`.
    pub fn error(message: impl Into<String>) -> Self {
        Response::ErrorResponse {
            error: message.into(),
            code: 0,
        }
    }
}

/// Why a frame body could not be turned into a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not a msgpack map with a string `type`.
    #[error("malformed message: expected a msgpack map with a string \"type\" field ({0})")]
    NotTagged(String),
    /// A tag this side does not know.
    #[error("Unknown request: {0}")]
    UnknownType(String),
    /// A known tag whose fields are missing or of the wrong type.
    #[error("malformed {message}: {detail}")]
    BadFields { message: String, detail: String },
}

#[derive(Deserialize)]
struct TagOnly {
    #[serde(rename = "type")]
    kind: String,
}

/// Decode a request body.
pub fn decode_request(body: &[u8]) -> Result<Request, DecodeError> {
    let tag: TagOnly =
        rmp_serde::from_slice(body).map_err(|e| DecodeError::NotTagged(e.to_string()))?;
    if !REQUEST_TAGS.contains(&tag.kind.as_str()) {
        return Err(DecodeError::UnknownType(type_name(&tag.kind)));
    }
    rmp_serde::from_slice(body).map_err(|e| DecodeError::BadFields {
        message: type_name(&tag.kind),
        detail: e.to_string(),
    })
}

/// Decode a response body.
pub fn decode_response(body: &[u8]) -> Result<Response, DecodeError> {
    let tag: TagOnly =
        rmp_serde::from_slice(body).map_err(|e| DecodeError::NotTagged(e.to_string()))?;
    rmp_serde::from_slice(body).map_err(|e| DecodeError::BadFields {
        message: type_name(&tag.kind),
        detail: e.to_string(),
    })
}

/// Encode any message as a msgpack map with field names.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    // Serializing these closed types into a Vec cannot fail (no maps with non-string keys, no I/O).
    rmp_serde::to_vec_named(message).unwrap_or_default()
}

/// The class name Dynamo uses in messages: `allocate_request` → `AllocateRequest`.
pub fn type_name(tag: &str) -> String {
    let mut out = String::with_capacity(tag.len());
    let mut upper = true;
    for c in tag.chars().take(64) {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

impl Request {
    /// The class name of this request (`AllocateRequest`).
    pub fn name(&self) -> String {
        let tag = match self {
            Request::HandshakeRequest { .. } => "handshake_request",
            Request::CommitRequest {} => "commit_request",
            Request::GetLockStateRequest {} => "get_lock_state_request",
            Request::GetAllocationStateRequest {} => "get_allocation_state_request",
            Request::AllocateRequest { .. } => "allocate_request",
            Request::ExportAllocationRequest { .. } => "export_allocation_request",
            Request::GetAllocationRequest { .. } => "get_allocation_request",
            Request::ListAllocationsRequest { .. } => "list_allocations_request",
            Request::FreeAllocationRequest { .. } => "free_allocation_request",
            Request::MetadataPutRequest { .. } => "metadata_put_request",
            Request::MetadataGetRequest { .. } => "metadata_get_request",
            Request::MetadataDeleteRequest { .. } => "metadata_delete_request",
            Request::MetadataListRequest { .. } => "metadata_list_request",
            Request::GetMemoryLayoutHashRequest {} => "get_memory_layout_hash_request",
            Request::GetRuntimeStateRequest {} => "get_runtime_state_request",
            Request::GetEventHistoryRequest {} => "get_event_history_request",
            Request::ClearAllRequest {} => "clear_all_request",
        };
        type_name(tag)
    }

    /// Allowed only for a writer (spec §2.3 RW_REQUIRED).
    pub fn requires_rw(&self) -> bool {
        matches!(
            self,
            Request::AllocateRequest { .. }
                | Request::FreeAllocationRequest { .. }
                | Request::MetadataPutRequest { .. }
                | Request::MetadataDeleteRequest { .. }
                | Request::CommitRequest {}
                | Request::ClearAllRequest {}
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_maps_tagged_by_type_with_named_fields() {
        let body = encode(&Request::AllocateRequest {
            size: 10,
            tag: "weights".into(),
        });
        // fixmap of 3 entries, first key "type".
        assert_eq!(body[0], 0x83);
        assert_eq!(&body[1..6], b"\xa4type");
        let back = decode_request(&body).unwrap();
        assert_eq!(
            back,
            Request::AllocateRequest {
                size: 10,
                tag: "weights".into()
            }
        );
    }

    #[test]
    fn defaults_and_aliases_decode() {
        #[derive(Serialize)]
        struct Raw<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            lock_type: &'a str,
        }
        let body = rmp_serde::to_vec_named(&Raw {
            kind: "handshake_request",
            lock_type: "rw_or_ro",
        })
        .unwrap();
        assert_eq!(
            decode_request(&body).unwrap(),
            Request::HandshakeRequest {
                lock_type: RequestedLockType::Auto,
                timeout_ms: None,
                profile_session_id: None
            }
        );
    }

    #[test]
    fn unknown_and_malformed_messages_are_named() {
        #[derive(Serialize)]
        struct Raw<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            size: &'a str,
        }
        let unknown = rmp_serde::to_vec_named(&Raw {
            kind: "launch_missiles_request",
            size: "x",
        })
        .unwrap();
        assert_eq!(
            decode_request(&unknown).unwrap_err().to_string(),
            "Unknown request: LaunchMissilesRequest"
        );
        let bad = rmp_serde::to_vec_named(&Raw {
            kind: "allocate_request",
            size: "big",
        })
        .unwrap();
        let message = decode_request(&bad).unwrap_err().to_string();
        assert!(
            message.starts_with("malformed AllocateRequest"),
            "{message}"
        );
        assert!(matches!(
            decode_request(b"\xc1garbage"),
            Err(DecodeError::NotTagged(_))
        ));
        assert!(matches!(
            decode_request(b""),
            Err(DecodeError::NotTagged(_))
        ));
    }

    #[test]
    fn bytes_travel_as_bin_and_list_elements_carry_their_tag() {
        let body = encode(&Response::MetadataGetResponse {
            found: true,
            allocation_id: Some("a".into()),
            offset_bytes: Some(4),
            value: Some(vec![1, 2, 3]),
        });
        assert!(body.windows(5).any(|w| w == [0xc4, 3, 1, 2, 3]));
        let list = encode(&Response::ListAllocationsResponse {
            allocations: vec![AllocationInfo {
                allocation_id: "a".into(),
                size: 1,
                aligned_size: 2,
                tag: "t".into(),
                layout_slot: 0,
            }],
        });
        assert!(list
            .windows(b"get_allocation_response".len())
            .any(|w| w == b"get_allocation_response"));
        assert!(matches!(
            decode_response(&list).unwrap(),
            Response::ListAllocationsResponse { allocations } if allocations.len() == 1
        ));
    }
}
