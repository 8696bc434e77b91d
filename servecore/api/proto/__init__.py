"""The OIP v2 gRPC definition (inference.proto) and, after ``make install``, its compiled stubs."""
