# Builds the master (`cimaster`) and agent (`cimaster-agent`) images, and the agent's checkout helper:
#   docker build --target master -t cimaster/master .
#   docker build --target agent  -t cimaster/agent .
#   docker build --target git    -t cimaster/git .     (CIMASTER_AGENT_GIT_IMAGE)
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p cimaster-master -p cimaster-agent --bins

FROM debian:bookworm-slim AS master
# git (and ssh) read git jobs' config files at trigger time.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl git openssh-client \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/cimaster /usr/local/bin/cimaster
USER 65534
ENV CIMASTER_LISTEN=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["cimaster"]
CMD ["serve"]

FROM debian:bookworm-slim AS agent
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/cimaster-agent /usr/local/bin/cimaster-agent
ENTRYPOINT ["cimaster-agent"]

FROM debian:bookworm-slim AS git
# git and ssh check out; iptables sets the egress rules; bash and curl run the agent's warden.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates git openssh-client iptables curl \
    && rm -rf /var/lib/apt/lists/*
CMD ["bash"]
