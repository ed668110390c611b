"""The generated controller stubs, with a clear error when a source checkout has not generated them."""

try:
    from eesd_client._proto.eesd.v1 import common_pb2, controller_pb2, controller_pb2_grpc
except ModuleNotFoundError as error:
    if not (error.name or "").startswith("eesd_client._proto"):
        raise
    # Only a source checkout lacks them: built packages ship them (client/setup.py refuses otherwise).
    raise ModuleNotFoundError(
        "eesd_client's generated stubs are missing: run `make proto` at the repository root"
    ) from error

__all__ = ["common_pb2", "controller_pb2", "controller_pb2_grpc"]
