/*
 * fuzz.h — what every libFuzzer target in tests/fuzz/ shares.
 *
 * A target checks properties, not only "no crash": FUZZ_CHECK states one, and a violated
 * property prints what was expected and aborts, which libFuzzer turns into a crash report
 * (stack, and the input saved under -artifact_prefix).  ASan/UBSan catch memory errors and
 * undefined behaviour on their own; leaks are reported when the input has been run.
 *
 * Targets are single-threaded and keep their long-lived state (keyring, compiled policy)
 * in statics built once in LLVMFuzzerInitialize: reachable, so never reported as leaks.
 */
#ifndef PEP_TESTS_FUZZ_H
#define PEP_TESTS_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Aborts (a libFuzzer crash) with file:line and a message unless cond holds. */
#define FUZZ_CHECK(cond, ...)                                                                      \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: property violated: %s: ", __FILE__, __LINE__, #cond);          \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

/* A NUL-terminated copy of the input (inputs are not strings); the caller frees it. */
static inline char *fuzz_strndup(const uint8_t *data, size_t size) {
    char *s = malloc(size + 1);
    if (!s) abort();
    for (size_t i = 0; i < size; i++)
        s[i] = (char)data[i];
    s[size] = '\0';
    return s;
}

#endif
