"""Serving: start a Triton Inference Server on a generated model repository, and talk to it.

`server.start_server(repo)` / `server.serve(repo)` run tritonserver (from PATH, or the binary inside
the `nvidia-pytriton` wheel); `client.Af3Client` sends audio bytes + a prompt over HTTP and streams
answers over gRPC. The repository itself is written by `af3trt.build.triton.write_repository`.
`openai_server` is the OpenAI-compatible API (in-process, or with `openai_triton.TritonBackend` in
front of a running repository).
"""
