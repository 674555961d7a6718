# the live stack (Redis, a worker, uvicorn) and the seeded hospitals the end-to-end tests use
from tests.e2e.conftest import live_demo, stack  # noqa: F401
