from servers.auth.server import SPEC
from servers.common.server import run

run(SPEC)
