# syntax=docker/dockerfile:1
#
# twhin-stream image.
#   docker build -t twhin-stream .
#   docker run --rm twhin-stream --help
#
# libtorch comes from the PyTorch pip wheel, as in .ci/setup. build.rs bakes
# `-Wl,-rpath=<libtorch lib dir>` into the binary, so the runtime stage puts the libraries at the
# very same path: /opt/venv/lib/python3.11/site-packages/torch/lib.
#
# The default PyPI wheel is the CUDA build. Its libtorch_cpu.so/libtorch_cuda.so need the CUDA
# libraries of the nvidia-* wheels (found through their own rpath, $ORIGIN/../../nvidia/...), so
# site-packages/nvidia is copied too. The image then runs on CPU anywhere and on a GPU with the
# NVIDIA container runtime (`--gpus all`). For a much smaller CPU-only image:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t twhin-stream .

# --- build ------------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS builder

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*

# Empty: PyPI (CUDA build). Set to https://download.pytorch.org/whl/cpu for the CPU build.
ARG TORCH_INDEX_URL=
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
        ${TORCH_INDEX_URL:+--index-url $TORCH_INDEX_URL} torch==2.11.0 \
 && test -f /opt/venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so \
 && mkdir -p /opt/venv/lib/python3.11/site-packages/nvidia

# An explicit LIBTORCH wins over the repo-relative one in .cargo/config.toml ([env] does not
# override variables that are already set).
ENV LIBTORCH=/opt/venv/lib/python3.11/site-packages/torch

WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin twhin-stream \
 && cp target/release/twhin-stream /usr/local/bin/twhin-stream

# --- run --------------------------------------------------------------------------------------
FROM debian:bookworm-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/twhin --shell /usr/sbin/nologin twhin \
 && mkdir -p /var/lib/twhin \
 && chown twhin:twhin /var/lib/twhin

# Same paths as in the builder: the rpath baked into the binary points here.
COPY --from=builder /opt/venv/lib/python3.11/site-packages/torch/lib /opt/venv/lib/python3.11/site-packages/torch/lib
COPY --from=builder /opt/venv/lib/python3.11/site-packages/nvidia /opt/venv/lib/python3.11/site-packages/nvidia
COPY --from=builder /usr/local/bin/twhin-stream /usr/local/bin/twhin-stream

WORKDIR /app
# config/default.toml is compiled in; the folder holds the other schemas (use --config).
# topics/ is kafka.topics_dir (default "topics", relative to this WORKDIR), used by `topics apply`.
COPY config/ config/
COPY topics/ topics/

# Everything that must survive the container lives in the volume, under storage.path: the graph,
# the trainer's checkpoints (store/checkpoints) and the publish ledger (version numbering),
# anchor and reference (store/publish). A volume from before that layout (checkpoints/ and
# publish/ beside store/) is refused at start with the keys to set.
ENV TWHIN_HTTP__BIND=0.0.0.0:8080 \
    TWHIN_STORAGE__PATH=/var/lib/twhin/store

USER twhin
VOLUME ["/var/lib/twhin"]
EXPOSE 8080

ENTRYPOINT ["twhin-stream"]
CMD ["run"]
