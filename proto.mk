# Regenerate the gRPC/protobuf code committed at the repo root; included from the Makefile.
PY ?= .venv/bin/python

.PHONY: proto
proto:
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. wallet.proto
