from servers.common.server import run
from servers.gpu.server import SPEC

run(SPEC)
