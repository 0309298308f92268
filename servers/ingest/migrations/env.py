from servers.common.migrations import run_env
from servers.ingest.ingester import metadata

run_env(metadata)
