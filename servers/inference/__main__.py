from servers.common.server import run
from servers.inference.server import SPEC

run(SPEC)
