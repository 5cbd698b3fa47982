/*
 * test_util.c — clocks and formats, durations and sizes, encodings, request ids, and the
 * string map (pep/util.c, pep/strmap.c).
 */
#include "pep/strmap.h"
#include "pep/util.h"

#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

static void test_durations(void **state) {
    (void)state;
    static const struct {
        const char *in;
        int rc;
        int64_t ms;
    } cases[] = {
        {"250ms", 0, 250},       {"30s", 0, 30000},      {"5m", 0, 300000},
        {"1h", 0, 3600000},      {"24h", 0, 86400000},   {"7d", 0, 604800000},
        {"0s", PEP_EINVAL, 0},   {"", PEP_EINVAL, 0},    {"10", PEP_EINVAL, 0},
        {"1.5s", PEP_EINVAL, 0}, {"-1s", PEP_EINVAL, 0}, {"1 s", PEP_EINVAL, 0},
        {"1sec", PEP_EINVAL, 0}, {"s", PEP_EINVAL, 0},   {"99999999999999999999d", PEP_EINVAL, 0},
    };
    for (size_t i = 0; i < PEP_ARRAY_LEN(cases); i++) {
        int64_t ms = -1;
        int rc = pep_parse_duration_ms(cases[i].in, &ms);
        if (rc != cases[i].rc) fprintf(stderr, "duration '%s': rc %d\n", cases[i].in, rc);
        assert_int_equal(rc, cases[i].rc);
        if (rc == 0) assert_int_equal(ms, cases[i].ms);
    }
}

static void test_sizes(void **state) {
    (void)state;
    static const struct {
        const char *in;
        int rc;
        uint64_t bytes;
    } cases[] = {
        {"1MiB", 0, 1048576},    {"1MB", 0, 1000000},    {"4KiB", 0, 4096},
        {"512", 0, 512},         {"10B", 0, 10},         {"2GiB", 0, 2147483648ull},
        {"1mib", PEP_EINVAL, 0}, {"MiB", PEP_EINVAL, 0}, {"1.5MiB", PEP_EINVAL, 0},
        {"", PEP_EINVAL, 0},
    };
    for (size_t i = 0; i < PEP_ARRAY_LEN(cases); i++) {
        uint64_t b = 0;
        assert_int_equal(pep_parse_size(cases[i].in, &b), cases[i].rc);
        if (cases[i].rc == 0) assert_int_equal(b, cases[i].bytes);
    }
}

static void test_rfc3339(void **state) {
    (void)state;
    char buf[32];
    pep_format_rfc3339_us(1795468904123456LL, buf);
    assert_string_equal(buf, "2026-11-23T21:21:44.123456Z");
    int64_t us = 0;
    assert_int_equal(pep_parse_rfc3339(buf, &us), 0);
    assert_int_equal(us, 1795468904123456LL);
    assert_int_equal(pep_parse_rfc3339("2026-11-23T22:21:44+01:00", &us), 0);
    assert_int_equal(us, 1795468904000000LL);
    assert_int_equal(pep_parse_rfc3339("2026-11-23T21:21:44.5Z", &us), 0);
    assert_int_equal(us, 1795468904500000LL);
    static const char *const bad[] = {"2026-11-23",
                                      "2026-13-01T00:00:00Z",
                                      "2026-11-23T20:01:44",
                                      "2026-11-23T20:01:44Zjunk",
                                      "2026-11-23T25:00:00Z",
                                      "2026-11-23T20:01:44.Z",
                                      ""};
    for (size_t i = 0; i < PEP_ARRAY_LEN(bad); i++)
        assert_int_equal(pep_parse_rfc3339(bad[i], &us), PEP_EINVAL);
}

static void test_encodings(void **state) {
    (void)state;
    /* RFC 4648 test vectors, in the url-safe alphabet without padding */
    static const struct {
        const char *in, *out;
    } vectors[] = {{"", ""},           {"f", "Zg"},          {"fo", "Zm8"},         {"foo", "Zm9v"},
                   {"foob", "Zm9vYg"}, {"fooba", "Zm9vYmE"}, {"foobar", "Zm9vYmFy"}};
    for (size_t i = 0; i < PEP_ARRAY_LEN(vectors); i++) {
        char *b = pep_base64url_encode((const uint8_t *)vectors[i].in, strlen(vectors[i].in));
        assert_string_equal(b, vectors[i].out);
        free(b);
    }
    const uint8_t special[] = {0xfb, 0xff, 0xbf};
    char *b = pep_base64url_encode(special, 3);
    assert_string_equal(b, "-_-_");
    free(b);

    uint8_t digest[32], back[32];
    char hex[65];
    pep_sha256("abc", 3, digest);
    pep_hex(digest, 32, hex);
    assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    assert_int_equal(pep_unhex(hex, back, 32), 0);
    assert_memory_equal(back, digest, 32);
    assert_int_equal(pep_unhex("zz", back, 1), PEP_EINVAL);
    assert_int_equal(pep_unhex("abcd", back, 1), PEP_EINVAL); /* too long */
}

#define IDS_PER_THREAD 20000
static char ids[4][IDS_PER_THREAD][27];

static void *make_ids(void *arg) {
    char(*mine)[27] = arg;
    for (int i = 0; i < IDS_PER_THREAD; i++)
        pep_request_id(mine[i]);
    return NULL;
}

static int cmp_id(const void *a, const void *b) {
    return strcmp(a, b);
}

static void test_listen_addresses(void **state) {
    (void)state;
    static const struct {
        const char *spec;
        bool ok;
    } cases[] = {
        {"127.0.0.1:8080", true},   {"127.0.0.1:0", true},
        {"[::1]:65535", true},      {"localhost:1", true},
        {"127.0.0.1:65536", false}, /* getaddrinfo would wrap it */
        {"127.0.0.1:99999", false}, {"127.0.0.1:", false},
        {":8080", false},           {"8080", false},
        {"::1:8080", false},        {"127.0.0.1:80x", false},
        {"127.0.0.1:-1", false},    {"a b:80", false},
        {"a/b:80", false},          {"[::1:80", false},
    };
    for (size_t i = 0; i < PEP_ARRAY_LEN(cases); i++)
        if (pep_listen_address_ok(cases[i].spec) != cases[i].ok)
            fail_msg("'%s' should be %s", cases[i].spec, cases[i].ok ? "accepted" : "refused");
}

static void test_ids(void **state) {
    (void)state;
    char longest[130];
    memset(longest, 'a', 128);
    longest[128] = '\0';
    assert_true(pep_is_id(longest));
    longest[128] = 'a';
    longest[129] = '\0';
    assert_false(pep_is_id(longest));
    static const struct {
        const char *id;
        bool ok;
    } cases[] = {
        {"billing-bot", true}, {"a.b_c@d-e", true}, {"A9", true},    {"", false},
        {"a/b", false},        {"a b", false},      {"a%2f", false}, {"a?b", false},
        {"\xc3\xa9", false},   {"a\nb", false},
    };
    for (size_t i = 0; i < PEP_ARRAY_LEN(cases); i++)
        if (pep_is_id(cases[i].id) != cases[i].ok)
            fail_msg("'%s' should be %s", cases[i].id, cases[i].ok ? "accepted" : "refused");
    assert_false(pep_is_id(NULL));
}

static void test_request_ids_ordered_and_unique(void **state) {
    (void)state;
    pthread_t th[4];
    for (int t = 0; t < 4; t++)
        pthread_create(&th[t], NULL, make_ids, ids[t]);
    for (int t = 0; t < 4; t++)
        pthread_join(th[t], NULL);
    for (int t = 0; t < 4; t++) {
        for (int i = 0; i < IDS_PER_THREAD; i++) {
            assert_int_equal(strlen(ids[t][i]), 26);
            assert_int_equal(strspn(ids[t][i], "0123456789ABCDEFGHJKMNPQRSTVWXYZ"), 26);
            if (i > 0) /* strictly increasing within a thread: time-ordered */
                assert_true(strcmp(ids[t][i - 1], ids[t][i]) < 0);
        }
    }
    /* unique across threads */
    qsort(ids, 4 * IDS_PER_THREAD, 27, cmp_id);
    char(*all)[27] = (char(*)[27])ids;
    for (int i = 1; i < 4 * IDS_PER_THREAD; i++)
        assert_true(strcmp(all[i - 1], all[i]) < 0);
}

static void test_strmap(void **state) {
    (void)state;
    struct strmap *m = strmap_new();
    char key[32];
    static int values[5000];
    for (int i = 0; i < 5000; i++) {
        snprintf(key, sizeof key, "key-%d", i);
        void *old = &values[0];
        assert_int_equal(strmap_put(m, key, &values[i], &old), 0);
        assert_null(old);
    }
    assert_int_equal(strmap_len(m), 5000);
    for (int i = 0; i < 5000; i += 2) {
        snprintf(key, sizeof key, "key-%d", i);
        assert_ptr_equal(strmap_remove(m, key), &values[i]);
    }
    assert_int_equal(strmap_len(m), 2500);
    for (int i = 0; i < 5000; i++) {
        snprintf(key, sizeof key, "key-%d", i);
        assert_ptr_equal(strmap_get(m, key), i % 2 ? &values[i] : NULL);
    }
    /* replace returns the old value; removed keys can come back (tombstones reused) */
    void *old = NULL;
    assert_int_equal(strmap_put(m, "key-1", &values[2], &old), 0);
    assert_ptr_equal(old, &values[1]);
    assert_int_equal(strmap_put(m, "key-0", &values[0], &old), 0);
    assert_null(old);
    assert_int_equal(strmap_len(m), 2501);
    assert_null(strmap_remove(m, "absent"));
    strmap_free(m, NULL);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_durations),
        cmocka_unit_test(test_sizes),
        cmocka_unit_test(test_rfc3339),
        cmocka_unit_test(test_encodings),
        cmocka_unit_test(test_listen_addresses),
        cmocka_unit_test(test_ids),
        cmocka_unit_test(test_request_ids_ordered_and_unique),
        cmocka_unit_test(test_strmap),
    };
    return cmocka_run_group_tests_name("util", tests, NULL, NULL);
}
