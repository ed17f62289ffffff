"""Generated protobuf/gRPC code for pdserve's API, package `pdserve.v1`.

The *_pb2*.py files are produced by protos/generate.py and committed; edit the .proto files and
rerun it. PROTOCOL_VERSION is the version of the control messages in worker.proto: every one of
them carries it, and a worker rejects a message whose version it does not know. Bump it for any
change that an older worker would misread (a new required meaning, a reused field number).
"""

PROTOCOL_VERSION = 1
