from servers.common.migrations import run_env
from servers.gamed.models import Base

run_env(Base.metadata)
