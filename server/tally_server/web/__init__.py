"""The dashboard (dashboard.py) and the Prometheus endpoint (scrape.py): HTTP edges like
rpc, calling services only."""
