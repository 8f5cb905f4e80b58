//! `etcd-proto-gen PROTO_DIR OUT_DIR`: compiles etcd's KV/Watch/Lease subset into tonic client code.

use std::path::PathBuf;

fn main() {
    let mut args = std::env::args_os().skip(1);
    let (Some(proto_dir), Some(out_dir)) = (args.next(), args.next()) else {
        eprintln!("usage: etcd-proto-gen PROTO_DIR OUT_DIR");
        std::process::exit(2);
    };
    let proto_dir = PathBuf::from(proto_dir);
    let protoc = protoc_bin_vendored::protoc_bin_path().unwrap_or_else(|e| {
        eprintln!("no vendored protoc for this platform: {e}");
        std::process::exit(1);
    });
    // SAFETY: single-threaded; prost-build reads PROTOC when it runs protoc below.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let result = tonic_prost_build::configure()
        .build_server(false)
        .build_transport(true)
        .out_dir(&out_dir)
        .compile_protos(
            &[proto_dir.join("kv.proto"), proto_dir.join("rpc.proto")],
            &[proto_dir],
        );
    if let Err(e) = result {
        eprintln!("protoc failed: {e}");
        std::process::exit(1);
    }
}
