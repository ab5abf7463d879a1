//! Compiles the .proto files with protox (a protobuf compiler in Rust, so no `protoc` is needed) and
//! generates the prost messages and tonic services into OUT_DIR.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["flotilla/agent/v1/agent.proto", "flotilla/platform/v1/platform.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    // Bundle chunks are slices of one shared buffer on the hub, not copies per session.
    tonic_prost_build::configure()
        .bytes(".flotilla.agent.v1.BundleChunk.data")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
