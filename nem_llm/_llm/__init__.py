"""Everything that talks to an LLM: the one adjudication call, the governor, strategies.

The prompt and the instructor call (``adjudication``), the governor that every call goes
through (semaphore, rate limits, retries, budget), the strategies that order the work,
run statistics, the decision cache and the local model launcher. Modules here may import
only the base modules (``catalog``, ``config``, ``models``, ``errors``, ``text``,
``_sqlite``); the matcher and the jobs import them.
"""
