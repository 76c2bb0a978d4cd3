FROM python:3.11-slim
# A plain (non-editable) install, as from a wheel: the image runs the installed package, which
# carries its migrations, so the sources are removed once installed.
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY relay ./relay
COPY migrations ./migrations
RUN pip install --no-cache-dir . && rm -rf /src
WORKDIR /app
ENV RELAY_HOST=0.0.0.0
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=2)"
CMD ["relay", "serve"]
