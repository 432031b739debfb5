# anpi-call-scheduler: the Cloud Run Job image. Built by deploy.sh with Cloud Build.
FROM python:3.11.14-slim-bookworm

# Logs reach Cloud Logging at once; no .pyc files in the image.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so a code change does not reinstall them.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin anpi

COPY main.py schema.sql ./

USER 10001

# Exec form: Cloud Run Job args (e.g. --dry-run) are appended to this command.
ENTRYPOINT ["python", "main.py"]
