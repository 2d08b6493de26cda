# Deployment artifacts (included by the Makefile): the validation tools, their tests, and the image.
#   make tools          install helm, kubectl, kubernetes-validate, hadolint, yamllint, promtool and
#                       docker-compose into .tools/ (idempotent; a second run takes under a second)
#   make test-deploy    only the deployment-artifact tests (tests/deploy)
#   make image          build the image with buildah from a debootstrapped base and smoke-test it with podman
#                       (slow, needs root; not part of `make test`)
# Uses BIN and STAMP from the Makefile.

.PHONY: tools test-deploy image image-build

tools:
	scripts/install-tools.sh

test-deploy: $(STAMP) tools
	$(BIN)/python -m pytest -q tests/deploy

image:
	scripts/build-image.sh

image-build:
	SKIP_SMOKE=1 scripts/build-image.sh
