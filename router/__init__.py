"""The router: pdserve's gRPC front end and the backend interface behind it.

`errors` (error types and their gRPC codes), `backend` (GenerationInput, TokenEvent, the
GenerationBackend protocol), `validation` (GenerateRequest -> GenerationInput), `server`
(RouterServicer, start_router: health, reflection, drain), `colocated` (a backend with one engine
in this process), `client` (PdserveClient, used by `pdserve client`, tests and benchmarks),
`wire` (request parsing that never raises), `guard` (client-safe error statuses with an error id),
`security`, `tls` and `auth` (TLS credentials and the bearer-token interceptor).
"""
