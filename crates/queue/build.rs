//! Compiles `proto/ferry_rocketmq.proto` (Ferry's own subset of the RocketMQ 5 gRPC schema) with
//! `protox` (pure Rust, no `protoc`) and generates the tonic server and client.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/ferry_rocketmq.proto");
    let fds = protox::compile(["proto/ferry_rocketmq.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
