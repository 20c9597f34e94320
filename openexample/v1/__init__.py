"""Generated protobuf code for package ``openexample.v1`` (``make proto``)."""
