# Every target installs what it needs (uv, then the locked environment) on a fresh machine.
.PHONY: server demo test protos format

server:  ## Run the server on its embedded SQLite default (./ergon.db) at 127.0.0.1:50051.
	scripts/uv.sh run --locked ergon-server

demo:    ## Start a throwaway server, run examples/quickstart.py against it, stop.
	scripts/demo.sh

test:    ## The whole suite: lint, format, types, buf lint, stub freshness, every test.
	scripts/test.sh

protos:  ## Regenerate the Python stubs from protos/.
	scripts/uv.sh run python scripts/gen_protos.py

format:
	scripts/uv.sh run ruff format .
	scripts/uv.sh run ruff check --fix .
