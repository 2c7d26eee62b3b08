"""`loupe serve`: the gRPC front door (package loupe.v1) for clients outside the cluster.

proto/loupe/v1/*.proto   the services; generated stubs next to them (``make protos``)
tensors.py               numpy <-> loupe.v1.Tensor (dtype + shape + little-endian bytes)
catalog.py               the runs a server follows, their checkpoints, loaded policies
batcher.py               groups concurrent Act requests into one forward pass
jobs.py                  evaluations on the Ray evaluators, persisted, resumable
server.py                the grpc.aio servicers, the token interceptor, health, reflection
client.py                a small client returning numpy arrays
bench.py                 `loupe bench --service` figures
"""
