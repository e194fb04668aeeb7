"""advserve's client side: the wire format (binary tensor framing) shared with the server.

The server imports `advserve_client.framing`, so both ends of the wire use one codec.
"""

from .framing import CONTENT_TYPE, HEADER_LENGTH, FramingError, RawTensor, decode, encode

__version__ = "0.1.0"
__all__ = ["CONTENT_TYPE", "HEADER_LENGTH", "FramingError", "RawTensor", "decode", "encode"]
