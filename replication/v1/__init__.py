"""Generated protobuf code (make proto)."""
