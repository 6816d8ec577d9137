from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "jobs"
    verbose_name = "Jobs (the original report's app)"
    default_auto_field = "django.db.models.BigAutoField"
