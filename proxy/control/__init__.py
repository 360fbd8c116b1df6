"""The supervisor process: workers, signals and shutdown, reload and the config in force, the
admin API and dashboard, metrics, active health checks, rollouts, webhooks, annotations, the
state file and the fleet store (Redis)."""
