from servers.auth.models import Base
from servers.common.migrations import run_env

run_env(Base.metadata)
