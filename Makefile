# pep — build, run, test, bench.  See README.md.
#
# Every target first runs `deps`, which checks the Debian -dev packages named in
# ../shared/DESIGN.md and installs the missing ones when run as root (otherwise it
# prints the exact apt-get line and stops).

BUILD      ?= build
CC         ?= cc
PKGS       := libmicrohttpd libjwt jansson libcrypto yaml-0.1 sqlite3 libcurl
DEB_PKGS   := libmicrohttpd-dev libjwt-dev libjansson-dev libssl-dev libyaml-dev \
              libsqlite3-dev libcurl4-openssl-dev libcmocka-dev pkg-config
EXTRA_CFLAGS ?=
CFLAGS     := -std=c11 -D_GNU_SOURCE -DPEP_LIBJWT_VERSION=\"$(shell pkg-config --modversion libjwt 2>/dev/null)\" -Wall -Wextra -Werror -O2 -g -pthread \
              -I. $(EXTRA_CFLAGS) $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
LDLIBS     := $(shell pkg-config --libs $(PKGS) 2>/dev/null) -pthread -lm
TEST_LDLIBS := $(shell pkg-config --libs cmocka 2>/dev/null)

LIB_SRC    := $(filter-out pep/main.c,$(wildcard pep/*.c)) $(wildcard audit/*.c)
LIB_OBJ    := $(LIB_SRC:%.c=$(BUILD)/obj/%.o)
HEADERS    := $(wildcard pep/*.h audit/*.h tests/integration/*.h tests/support/*.h)
UNIT_SRC   := $(wildcard tests/unit/test_*.c)
UNIT_BIN   := $(UNIT_SRC:tests/unit/%.c=$(BUILD)/tests/%)
ITEST_SRC  := $(wildcard tests/integration/test_*.c)
ITEST_BIN  := $(ITEST_SRC:tests/integration/%.c=$(BUILD)/tests/i%)
ITEST_LIB  := $(filter-out $(ITEST_SRC),$(wildcard tests/integration/*.c))
TEST_SUPPORT := $(patsubst %.c,$(BUILD)/obj/%.o,$(wildcard tests/support/*.c))
TOOLS      := $(BUILD)/pep $(BUILD)/pepctl $(BUILD)/mockllm

# Only pattern rules name the test-support objects: keep make from deleting them as
# intermediates after every build.
.SECONDARY: $(TEST_SUPPORT)

.PHONY: all deps run test test-suite test-one bench clean format lint
all: deps $(TOOLS) $(UNIT_BIN) $(ITEST_BIN)

deps:
	@sh tools/deps.sh $(DEB_PKGS)

$(BUILD)/obj/%.o: %.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/libpep.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/pep: $(BUILD)/obj/pep/main.o $(BUILD)/libpep.a
	$(CC) $(CFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/pepctl: tools/pepctl.c tools/pepctl_audit.c $(BUILD)/libpep.a $(HEADERS)
	$(CC) $(CFLAGS) -o $@ tools/pepctl.c $(BUILD)/libpep.a $(LDLIBS)

$(BUILD)/mockllm: tools/mockllm.c $(HEADERS)
	$(CC) $(CFLAGS) -o $@ tools/mockllm.c $(LDLIBS)

$(BUILD)/tests/test_%: tests/unit/test_%.c $(TEST_SUPPORT) $(BUILD)/libpep.a $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(TEST_SUPPORT) $(BUILD)/libpep.a $(LDLIBS) $(TEST_LDLIBS)

$(BUILD)/tests/itest_%: tests/integration/test_%.c $(ITEST_LIB) $(TEST_SUPPORT) $(BUILD)/libpep.a $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(ITEST_LIB) $(TEST_SUPPORT) $(BUILD)/libpep.a $(LDLIBS) $(TEST_LDLIBS)

# Runs every unit test, then every integration test, in this build dir; prints
# cmocka's summary lines and a total.
test-suite: all
	@sh tests/run.sh $(BUILD)

# make test: style checks (when clang-format and cppcheck are installed), the whole suite,
# then the suite again under ASan+UBSan in build-asan/.
test: deps
	@if command -v clang-format >/dev/null && command -v cppcheck >/dev/null; then \
	    $(MAKE) --no-print-directory lint; \
	else echo "lint: clang-format or cppcheck not installed, style checks skipped"; fi
	@$(MAKE) --no-print-directory test-suite BUILD=build
	@$(MAKE) --no-print-directory test-suite BUILD=build-asan \
	    EXTRA_CFLAGS="-O1 -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all"
	@$(MAKE) --no-print-directory fuzz-smoke

# make test-one T=policy   (runs build/tests/test_policy or build/tests/itest_policy)
test-one: all
	@sh tests/run.sh $(BUILD) $(T)

run: deps $(TOOLS)
	@sh tools/run.sh $(BUILD)

$(BUILD)/ratelimit_mem: tools/bench/ratelimit_mem.c $(BUILD)/libpep.a $(HEADERS)
	$(CC) $(CFLAGS) -o $@ tools/bench/ratelimit_mem.c $(BUILD)/libpep.a $(LDLIBS)

$(BUILD)/audit_gen: tools/bench/audit_gen.c $(BUILD)/libpep.a $(HEADERS)
	$(CC) $(CFLAGS) -o $@ tools/bench/audit_gen.c $(BUILD)/libpep.a $(LDLIBS)

bench: deps $(TOOLS) $(BUILD)/ratelimit_mem $(BUILD)/audit_gen
	@BASELINE="$(BASELINE)" sh tools/bench/bench.sh $(BUILD)

format:
	clang-format -i pep/*.[ch] audit/*.[ch] tools/*.c tests/unit/*.c tests/integration/*.[ch] tests/support/*.[ch]

lint:
	clang-format --dry-run --Werror pep/*.[ch] audit/*.[ch] tools/*.c tests/unit/*.c tests/integration/*.[ch] tests/support/*.[ch]
	cppcheck --quiet --error-exitcode=1 --enable=warning,portability --inline-suppr -I. pep audit tools

clean:
	rm -rf build build-asan

# ---- fuzzing (tests/fuzz/README.md) ---------------------------------------------------------
# libFuzzer targets, built with clang into build-fuzz/: the library again with coverage
# instrumentation and ASan+UBSan, and one binary per tests/fuzz/fuzz_*.c.
#   make fuzz FUZZ_S=60 [FUZZ_T="fuzz_token fuzz_route"]   fuzz each target FUZZ_S seconds
#   make fuzz-smoke    (part of make test) replay every committed corpus, fuzz FUZZ_SMOKE_S
#                      seconds more; fails on any crash, leak, hang or violated property
FUZZ_BUILD    ?= build-fuzz
FUZZ_CC       ?= clang
FUZZ_S        ?= 60
FUZZ_SMOKE_S  ?= 3
FUZZ_JOBS     ?= $(shell nproc 2>/dev/null || echo 2)
FUZZ_DEB_PKGS := clang libclang-rt-14-dev
# CFLAGS' -std/-D/-I/-W flags, -O1 for -O2.  No -Werror: gcc -Werror guards the code in
# every other build, and a warning only clang 14 gives must not stop the fuzzers.
FUZZ_CFLAGS   := $(filter-out -O2 -g -Werror,$(CFLAGS)) -O1 -g -fno-omit-frame-pointer \
                 -fsanitize=address,undefined -fno-sanitize-recover=all
FUZZ_TARGETS  := $(patsubst tests/fuzz/%.c,%,$(wildcard tests/fuzz/fuzz_*.c))
FUZZ_T        ?= $(FUZZ_TARGETS)
FUZZ_LIB_OBJ  := $(LIB_SRC:%.c=$(FUZZ_BUILD)/obj/%.o)

.PHONY: fuzz fuzz-smoke fuzz-build fuzz-bins fuzz-deps fuzz-clean
fuzz-deps:
	@sh tools/deps.sh $(DEB_PKGS) $(FUZZ_DEB_PKGS)

# Parallel unless make already runs with a jobserver (make -jN fuzz).
fuzz-build: fuzz-deps
	@$(MAKE) --no-print-directory $(if $(findstring jobserver,$(MAKEFLAGS)),,-j$(FUZZ_JOBS)) \
	    fuzz-bins

fuzz-bins: $(FUZZ_TARGETS:%=$(FUZZ_BUILD)/%)
	@:

fuzz: fuzz-build
	@sh tests/fuzz/run.sh fuzz $(FUZZ_BUILD) $(FUZZ_S) $(FUZZ_T)

fuzz-smoke: fuzz-build
	@sh tests/fuzz/run.sh smoke $(FUZZ_BUILD) $(FUZZ_SMOKE_S) $(FUZZ_TARGETS)

$(FUZZ_BUILD)/obj/%.o: %.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link -c $< -o $@

$(FUZZ_BUILD)/libpep.a: $(FUZZ_LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

# fuzz_admin_body includes pep/admin.c (to reach its static body parsers): no admin.o here.
$(FUZZ_BUILD)/libpep-noadmin.a: $(filter-out $(FUZZ_BUILD)/obj/pep/admin.o,$(FUZZ_LIB_OBJ))
	@rm -f $@
	ar rcs $@ $^

$(FUZZ_BUILD)/fuzz_admin_body: tests/fuzz/fuzz_admin_body.c tests/fuzz/fuzz.h pep/admin.c \
                               $(FUZZ_BUILD)/libpep-noadmin.a $(HEADERS)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer -o $@ $< $(FUZZ_BUILD)/libpep-noadmin.a $(LDLIBS)

$(FUZZ_BUILD)/fuzz_%: tests/fuzz/fuzz_%.c tests/fuzz/fuzz.h $(FUZZ_BUILD)/libpep.a $(HEADERS)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer -o $@ $< $(FUZZ_BUILD)/libpep.a $(LDLIBS)

fuzz-clean:
	rm -rf $(FUZZ_BUILD)
