"""gRPC servicers: protobuf <-> domain translation only; the engine decides everything."""
