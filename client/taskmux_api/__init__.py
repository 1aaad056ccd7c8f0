"""Generated Python code for the taskmux.v1 gRPC API (`make proto` writes `v1/`)."""
