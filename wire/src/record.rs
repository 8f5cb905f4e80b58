//! The instance record under `v1/instances/{ns}/{comp}/{ep}/{id:x}` (interop spec §2.2):
//! `{"type": "Endpoint", ..., "transport": {"tcp": "host:port/{id:x}/{ns}/{comp}/{ep}"},
//! "request_plane_codec": "msgpack"}`. A frontend dials `host:port` and sends the part after the
//! first `/` verbatim as the frame's endpoint path; the codec decides how request bodies are
//! encoded. dynamix workers add `engine`, `kv_block_size` and `capacity`; Dynamo ignores them, and a
//! dynamix frontend reads `engine` as "this worker takes the dynamix request extension".

use serde::{Deserialize, Serialize};

use crate::{PayloadCodec, PayloadCodecError};

/// Why a frontend cannot send requests to an instance; the text names the field.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// The record is not an `Endpoint`.
    #[error("type is {kind:?}, not \"Endpoint\"")]
    NotEndpoint {
        /// The `type` it has.
        kind: String,
    },
    /// `request_plane_codec` names a codec this build does not speak.
    #[error("request_plane_codec: {0}")]
    Codec(#[source] PayloadCodecError),
    /// The transport is not the TCP request plane.
    #[error("instance {instance_id:x} uses transport {transport:?}; this frontend speaks the TCP request plane only")]
    NotTcp {
        /// The instance.
        instance_id: u64,
        /// Its transport.
        transport: Transport,
    },
    /// `transport.tcp` is not `[tcp://]host:port[/path]`.
    #[error("instance {instance_id:x}: transport.tcp {url:?} is not [tcp://]host:port[/path]")]
    BadTcpUrl {
        /// The instance.
        instance_id: u64,
        /// The URL as given.
        url: String,
    },
}

/// How an instance is reached (externally tagged: `{"tcp": "..."}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// The TCP request plane: `[tcp://]host:port[/endpoint-path]`.
    Tcp(String),
    /// NATS request plane: the instance subject.
    NatsTcp(String),
    /// HTTP/2 request plane.
    Http(String),
}

/// A worker's discovery record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// `Endpoint` (Dynamo requires it; records with another type are not endpoints).
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Component name.
    pub component: String,
    /// Endpoint name.
    pub endpoint: String,
    /// Namespace.
    pub namespace: String,
    /// The primary lease id.
    pub instance_id: u64,
    /// Where requests go.
    pub transport: Transport,
    /// `cuda`, `cpu`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_type: Option<String>,
    /// `json` or `msgpack`: how to encode request bodies (absent = JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_plane_codec: Option<String>,
    /// dynamix: the engine kind it runs (`mocker`, `model`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    /// dynamix: its KV block size in tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_block_size: Option<usize>,
    /// dynamix: requests it admits at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<usize>,
    /// dynamix: the version of the multiplexed request plane ([`crate::mux`]) its TCP address also
    /// serves. Dynamo ignores the field and sends its own frames there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mux: Option<u32>,
}

/// Where a TCP request goes: the address to dial and the path to put in each frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpTarget {
    /// `host:port`.
    pub address: String,
    /// The frame's endpoint path.
    pub path: String,
}

/// The endpoint path of an instance: `{id:x}/{ns}/{comp}/{ep}`.
pub fn endpoint_path(instance_id: u64, namespace: &str, component: &str, endpoint: &str) -> String {
    format!("{instance_id:x}/{namespace}/{component}/{endpoint}")
}

impl Instance {
    /// A dynamix worker's record: `Endpoint`, reached at `address` (`host:port`).
    pub fn endpoint(
        namespace: &str,
        component: &str,
        endpoint: &str,
        instance_id: u64,
        address: &str,
        codec: PayloadCodec,
    ) -> Instance {
        Instance {
            kind: Some("Endpoint".into()),
            component: component.into(),
            endpoint: endpoint.into(),
            namespace: namespace.into(),
            instance_id,
            transport: Transport::Tcp(format!(
                "{address}/{}",
                endpoint_path(instance_id, namespace, component, endpoint)
            )),
            device_type: None,
            request_plane_codec: Some(codec.name().into()),
            engine: None,
            kv_block_size: None,
            capacity: None,
            mux: Some(crate::mux::VERSION),
        }
    }

    /// Checks what a frontend needs: the `Endpoint` type when present, and a codec it speaks. The
    /// error names the field.
    pub fn check(&self) -> Result<(), InstanceError> {
        if let Some(kind) = self.kind.as_deref().filter(|k| *k != "Endpoint") {
            return Err(InstanceError::NotEndpoint { kind: kind.into() });
        }
        PayloadCodec::parse(self.request_plane_codec.as_deref()).map_err(InstanceError::Codec)?;
        Ok(())
    }

    /// The codec of request bodies.
    pub fn codec(&self) -> PayloadCodec {
        PayloadCodec::parse(self.request_plane_codec.as_deref()).unwrap_or_default()
    }

    /// Whether the instance serves the multiplexed request plane this build speaks.
    pub fn speaks_mux(&self) -> bool {
        self.mux == Some(crate::mux::VERSION)
    }

    /// Whether the worker is a dynamix worker (takes `extra_args.dynamix`).
    pub fn is_dynamix(&self) -> bool {
        self.engine.is_some()
    }

    /// The address and frame path of a TCP transport, `[tcp://]host:port[/path]`. Without a path
    /// the path is the instance's own (`{id:x}/{ns}/{comp}/{ep}`). Other transports are an error
    /// naming them.
    pub fn tcp_target(&self) -> Result<TcpTarget, InstanceError> {
        let url = match &self.transport {
            Transport::Tcp(url) => url,
            other => {
                return Err(InstanceError::NotTcp {
                    instance_id: self.instance_id,
                    transport: other.clone(),
                })
            }
        };
        let rest = url.strip_prefix("tcp://").unwrap_or(url);
        let (address, path) = match rest.split_once('/') {
            Some((address, path)) if !path.is_empty() => (address, path.to_string()),
            split => (
                split.map_or(rest, |(address, _)| address),
                endpoint_path(
                    self.instance_id,
                    &self.namespace,
                    &self.component,
                    &self.endpoint,
                ),
            ),
        };
        let port_ok = address
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok {
            return Err(InstanceError::BadTcpUrl {
                instance_id: self.instance_id,
                url: url.clone(),
            });
        }
        Ok(TcpTarget {
            address: address.to_string(),
            path,
        })
    }

    /// `host:port` of a TCP transport.
    pub fn tcp_address(&self) -> Result<String, InstanceError> {
        self.tcp_target().map(|t| t.address)
    }
}
