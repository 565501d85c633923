"""Generated protobuf and gRPC stubs for Sluice's APIs; generated code only."""
