"""The enrollment service: a user's signed verifier files over HTTP (toolchain.serve.app)."""
