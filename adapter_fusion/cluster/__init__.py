"""Many replicas of the server behind one gRPC endpoint, on Ray Serve (the `cluster` extra).

Without Ray: `shared_catalog` (the store shared by every replica), `wire` (what a replica hands the
ingress), `proxy_servicers` (what Ray Serve's gRPC proxy registers), `cluster_settings` (what the
command and a Serve config file set). With Ray: `ingress` and `replica`, the two deployments, and `launch`,
which starts or joins a Ray cluster and deploys them (`adapter-fusion cluster`). The key a client
routes by is `adapter_fusion.routing`, in the torch-free API layer below.
"""
