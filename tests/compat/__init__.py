"""Compatibility checks with third-party clients (tritonclient, grpcurl, perf_analyzer).

The client code that imports ``tritonclient`` lives in scripts here and runs in a
subprocess: tritonclient registers its own copy of ``grpc_service.proto`` and
``model_config.proto`` in protobuf's default descriptor pool, which clashes with our
``sluice_api`` stubs in the same process. Nothing in this package imports tritonclient.
"""
