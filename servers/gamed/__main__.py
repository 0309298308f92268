from servers.common.server import run
from servers.gamed.server import SPEC

run(SPEC)
