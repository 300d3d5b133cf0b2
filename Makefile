EXTENSION = saga
EXTVERSION = $(shell grep default_version $(EXTENSION).control | sed -e "s/default_version[[:space:]]*=[[:space:]]*'\([^']*\)'/\1/")

MODULE_big = saga
OBJS = \
	src/saga.o \
	src/guc.o \
	src/shmem.o \
	src/launcher.o \
	src/worker.o \
	src/outbox.o \
	src/transport_http.o \
	src/transport_pg.o \
	src/api.o \
	src/api_saga.o \
	src/engine.o \
	src/inbox.o \
	src/invoke.o \
	src/maintenance.o \
	src/definitions.o \
	src/routing.o \
	src/row_insert.o \
	src/uuid7.o

DATA = $(wildcard sql/saga--*.sql)

PG_CPPFLAGS = -I$(srcdir)/src -I$(libpq_srcdir)
SHLIB_LINK = -lcurl
SHLIB_LINK_INTERNAL = $(libpq)

REGRESS = setup destinations subscriptions publish dead_letters monitoring sagas invoke maintenance inbox
REGRESS_OPTS = --temp-config=$(srcdir)/test/saga.conf --temp-instance=tmp_check_regress --load-extension=saga

TAP_TESTS = 1
PROVE_TESTS = test/t/*.pl

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# PGXS tracks no header dependencies: rebuild everything when one changes
$(OBJS): $(wildcard $(srcdir)/src/*.h)
