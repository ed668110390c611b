"""Load generator of EESD Serve (through the asyncio client SDK): closed-loop concurrency or open-loop Poisson
rates, TTFT/TPOT/ITL/e2e percentiles, throughput, goodput under an SLO, errors by status, and the servers'
speculation metrics scraped before and after each run. `python -m loadtest --help`; docs/observability.md."""
