"""Generated gRPC code of protos/kvrelay/internal/v1/*.proto. Do not edit: run `python scripts/gen_protos.py`."""

# The grpcio-tools version that generated these files; tests/kvrelay/test_protos.py compares bytes only under it.
GRPC_TOOLS_VERSION = "1.84.0"
