//! Compiles Concord's own etcd v3 .proto files without a system `protoc`:
//! `protox` (a Rust protobuf compiler) produces the descriptor set and
//! `tonic-prost-build` turns it into message types, servers and clients.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/mvccpb/kv.proto", "proto/etcdserverpb/rpc.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
