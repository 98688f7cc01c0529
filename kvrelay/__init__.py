"""kvrelay's gRPC contracts. The code in kvrelay/v1 is generated from protos/ by scripts/gen_protos.py."""
