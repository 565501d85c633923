"""gRPC transport: servicers, interceptors and protobuf converters. Protobuf stops here."""
