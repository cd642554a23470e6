"""Clients of a running server or of an exported model: `mnist-predict` (predict) and the gRPC client."""
