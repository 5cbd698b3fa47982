/*
 * keys.c — pep's ES256 signing keys: load, create, rotate, publish (JWKS), sign.
 *
 * Each key is one unencrypted PKCS#8 PEM file DATA/keys/<kid>.pem (mode 0600, written
 * atomically) in a 0700 directory.  The kid is the RFC 7638 thumbprint of the public key:
 * base64url(SHA-256('{"crv":"P-256","kty":"EC","x":"…","y":"…"}')), so it is derived from
 * the key itself and the file name is only a convenience.  The newest file (mtime; ties
 * broken by the greatest kid) signs; every key in the directory verifies.
 *
 * Invariants of a loaded keyring: at least one key; keys[] sorted newest first, so
 * keys[0] is the active key; kids are distinct; every key is a P-256 key pair whose
 * public half matches its private half (pairwise-checked at load), held parsed twice: the
 * pair (signs) and the public half alone (verifies, parsed from the public PEM the way any
 * other verifier would see it).
 *
 * Signing builds the compact JWS here — header and claims as compact JSON with sorted keys,
 * base64url, then ES256 over "header.payload" with EVP_DigestSign and the DER signature
 * OpenSSL returns rewritten as the raw R‖S a JWS carries.  libjwt is not used: its encoder
 * re-parses the private PEM on every signature.
 *
 * Threads: loading, creating and rotating do file I/O and belong to the main thread or
 * the admin handler doing a rotation.  A loaded keyring is immutable and may be read from
 * any thread; each signature has its own EVP_MD_CTX.
 */
#include "pep/keys.h"

#include "pep/util.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/obj_mac.h>
#include <openssl/objects.h>
#include <openssl/pem.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* One key pair. */
struct keys_entry {
    char kid[KEYS_KID_LEN + 1]; /* RFC 7638 thumbprint */
    char x[KEYS_KID_LEN + 1];   /* base64url of the 32-byte X coordinate (JWKS) */
    char y[KEYS_KID_LEN + 1];   /* base64url of the 32-byte Y coordinate (JWKS) */
    unsigned char *private_pem; /* PKCS#8 PEM (the file's content); cleansed on free */
    size_t private_pem_len;     /* bytes, without the trailing NUL kept after them */
    unsigned char *public_pem;  /* SubjectPublicKeyInfo PEM (tests cross-check libjwt) */
    size_t public_pem_len;
    EVP_PKEY *pkey;        /* the parsed key pair: signs */
    EVP_PKEY *public_key;  /* the public half alone, parsed from public_pem: verifies */
    struct timespec mtime; /* of the key file: orders keys, newest signs */
};

struct keyring {
    struct keys_entry *keys; /* newest first; keys[0] is the active key */
    size_t len;              /* ≥ 1 */
};

#define KEYS_COORD_LEN 32 /* P-256 coordinates, big-endian, left-padded */

static void keys_entry_clear(struct keys_entry *e) {
    if (e->private_pem) {
        OPENSSL_cleanse(e->private_pem, e->private_pem_len);
        free(e->private_pem);
    }
    free(e->public_pem);
    EVP_PKEY_free(e->pkey);
    EVP_PKEY_free(e->public_key);
    memset(e, 0, sizeof *e);
}

void keys_free(struct keyring *k) {
    if (!k) return;
    for (size_t i = 0; i < k->len; i++)
        keys_entry_clear(&k->keys[i]);
    free(k->keys);
    free(k);
}

/* Copies a memory BIO's contents into a malloc'd NUL-terminated buffer. */
static int keys_bio_take(BIO *bio, unsigned char **out, size_t *out_len) {
    char *data = NULL;
    long n = BIO_get_mem_data(bio, &data);
    if (n <= 0 || !data) return PEP_ECRYPTO;
    unsigned char *copy = malloc((size_t)n + 1);
    if (!copy) return PEP_ENOMEM;
    memcpy(copy, data, (size_t)n);
    copy[n] = '\0';
    *out = copy;
    *out_len = (size_t)n;
    return 0;
}

/* Writes one public coordinate as base64url of exactly 32 bytes. */
static int keys_coord_b64(const EVP_PKEY *pkey, const char *param, char out[KEYS_KID_LEN + 1]) {
    BIGNUM *bn = NULL;
    uint8_t buf[KEYS_COORD_LEN];
    char *b64 = NULL;
    int rc = PEP_ECRYPTO;

    if (EVP_PKEY_get_bn_param(pkey, param, &bn) != 1) goto out;
    if (BN_bn2binpad(bn, buf, sizeof buf) != (int)sizeof buf) goto out;
    b64 = pep_base64url_encode(buf, sizeof buf);
    if (!b64) {
        rc = PEP_ENOMEM;
        goto out;
    }
    if (strlen(b64) != KEYS_KID_LEN) goto out;
    memcpy(out, b64, KEYS_KID_LEN + 1);
    rc = 0;
out:
    BN_free(bn);
    free(b64);
    return rc;
}

/* True when pkey is an EC key on P-256 (prime256v1 / secp256r1). */
static bool keys_is_p256(const EVP_PKEY *pkey) {
    char group[64];
    size_t len = 0;
    if (!EVP_PKEY_is_a(pkey, "EC")) return false;
    if (EVP_PKEY_get_group_name(pkey, group, sizeof group, &len) != 1) return false;
    int nid = OBJ_txt2nid(group);
    if (nid == NID_undef) nid = EC_curve_nist2nid(group);
    return nid == NID_X9_62_prime256v1;
}

/*
 * Fills e from a P-256 key pair (taking ownership of pkey on success): coordinates,
 * thumbprint kid, private and public PEM, and the public key parsed back from its PEM.
 */
static int keys_entry_from_pkey(EVP_PKEY *pkey, struct keys_entry *e, struct pep_err *err) {
    BIO *priv = NULL, *pub = NULL, *pub_in = NULL;
    EVP_PKEY_CTX *check = NULL;
    char *kid = NULL;
    int rc;

    memset(e, 0, sizeof *e);
    if (!keys_is_p256(pkey)) {
        rc = pep_err_set(err, PEP_ECRYPTO, "key is not an EC P-256 key");
        goto out;
    }
    /* SECURITY: a key file whose public half was swapped (tampering, corruption) would
     * publish a JWKS entry that does not verify our own signatures; refuse it at load. */
    check = EVP_PKEY_CTX_new_from_pkey(NULL, pkey, NULL);
    if (!check || EVP_PKEY_pairwise_check(check) != 1) {
        rc = pep_err_set(err, PEP_ECRYPTO, "key pair check failed");
        goto out;
    }
    if ((rc = keys_coord_b64(pkey, OSSL_PKEY_PARAM_EC_PUB_X, e->x)) != 0 ||
        (rc = keys_coord_b64(pkey, OSSL_PKEY_PARAM_EC_PUB_Y, e->y)) != 0) {
        pep_err_set(err, rc, "cannot read the public key coordinates");
        goto out;
    }

    /* RFC 7638 §3.2: required members only, lexicographic order, no whitespace. */
    char jwk[160];
    int n = snprintf(jwk, sizeof jwk,
                     "{\"crv\":\"P-256\",\"kty\":\"EC\",\"x\":\"%s\",\"y\":\"%s\"}", e->x, e->y);
    if (n < 0 || (size_t)n >= sizeof jwk) {
        rc = pep_err_set(err, PEP_ECRYPTO, "thumbprint input too long");
        goto out;
    }
    uint8_t digest[32];
    pep_sha256(jwk, (size_t)n, digest);
    kid = pep_base64url_encode(digest, sizeof digest);
    if (!kid || strlen(kid) != KEYS_KID_LEN) {
        rc = pep_err_set(err, PEP_ENOMEM, "out of memory");
        goto out;
    }
    memcpy(e->kid, kid, KEYS_KID_LEN + 1);

    priv = BIO_new(BIO_s_mem());
    pub = BIO_new(BIO_s_mem());
    if (!priv || !pub) {
        rc = pep_err_set(err, PEP_ENOMEM, "out of memory");
        goto out;
    }
    if (PEM_write_bio_PrivateKey(priv, pkey, NULL, NULL, 0, NULL, NULL) != 1 ||
        PEM_write_bio_PUBKEY(pub, pkey) != 1) {
        rc = pep_err_set(err, PEP_ECRYPTO, "cannot encode the key as PEM");
        goto out;
    }
    if ((rc = keys_bio_take(priv, &e->private_pem, &e->private_pem_len)) != 0 ||
        (rc = keys_bio_take(pub, &e->public_pem, &e->public_pem_len)) != 0) {
        pep_err_set(err, rc, "cannot copy the key PEM");
        goto out;
    }
    pub_in = BIO_new_mem_buf(e->public_pem, (int)e->public_pem_len);
    if (!pub_in || !(e->public_key = PEM_read_bio_PUBKEY(pub_in, NULL, NULL, NULL))) {
        rc = pep_err_set(err, PEP_ECRYPTO, "cannot parse the public key back");
        goto out;
    }
    e->pkey = pkey;
    rc = 0;
out:
    if (rc) {
        e->pkey = NULL; /* the caller still owns pkey on failure */
        keys_entry_clear(e);
    }
    EVP_PKEY_CTX_free(check);
    BIO_free(priv); /* memory BIOs clear their buffer when freed */
    BIO_free(pub);
    BIO_free(pub_in);
    free(kid);
    return rc;
}

/* SECURITY: an encrypted key file must fail to load, never prompt on the terminal. */
static int keys_no_passphrase(char *buf, int size, int rwflag, void *u) {
    (void)buf;
    (void)size;
    (void)rwflag;
    (void)u;
    return -1;
}

/* Loads one key file into e.  With repair, a key file others may read is set to 0600;
 * read-only loading (offline verification) changes nothing on disk: the directory may be
 * someone else's, or evidence. */
static int keys_load_file(const char *path, bool repair, struct keys_entry *e,
                          struct pep_err *err) {
    BIO *bio = NULL;
    EVP_PKEY *pkey = NULL;
    struct stat st;
    int rc;

    /* SECURITY: O_NOFOLLOW — a symlink planted in the key directory is not a key of ours. */
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return pep_err_set(err, PEP_EIO, "%s: %s", path, strerror(errno));
    if (fstat(fd, &st) != 0) {
        rc = pep_err_set(err, PEP_EIO, "%s: %s", path, strerror(errno));
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = pep_err_set(err, PEP_EIO, "%s: not a regular file", path);
        goto out;
    }
    /* SECURITY: a private key readable by others is repaired rather than refused, so
     * that a copy made with a lax umask does not keep pep from starting — but loudly. */
    if (repair && (st.st_mode & 077)) {
        fprintf(stderr, "pep: warning: key file %s had mode %04o; setting it to 0600\n", path,
                (unsigned)(st.st_mode & 07777));
        if (fchmod(fd, 0600) != 0) {
            rc = pep_err_set(err, PEP_EIO, "%s: chmod 0600: %s", path, strerror(errno));
            goto out;
        }
    }
    bio = BIO_new_fd(fd, BIO_NOCLOSE);
    if (!bio) {
        rc = pep_err_set(err, PEP_ENOMEM, "out of memory");
        goto out;
    }
    pkey = PEM_read_bio_PrivateKey(bio, NULL, keys_no_passphrase, NULL);
    if (!pkey) {
        rc = pep_err_set(err, PEP_ECRYPTO, "%s: not an unencrypted PEM private key", path);
        goto out;
    }
    if ((rc = keys_entry_from_pkey(pkey, e, err)) != 0) {
        char why[sizeof err->msg];
        snprintf(why, sizeof why, "%s", err ? err->msg : "");
        pep_err_set(err, rc, "%s: %s", path, why);
        goto out;
    }
    pkey = NULL; /* owned by e now */
    e->mtime = st.st_mtim;
    rc = 0;
out:
    EVP_PKEY_free(pkey);
    BIO_free(bio);
    close(fd);
    return rc;
}

/* Newest first; among equal mtimes the greatest kid first. */
static int keys_cmp_newest(const void *a, const void *b) {
    const struct keys_entry *x = a, *y = b;
    if (x->mtime.tv_sec != y->mtime.tv_sec) return x->mtime.tv_sec > y->mtime.tv_sec ? -1 : 1;
    if (x->mtime.tv_nsec != y->mtime.tv_nsec) return x->mtime.tv_nsec > y->mtime.tv_nsec ? -1 : 1;
    return -strcmp(x->kid, y->kid);
}

static bool keys_is_key_file_name(const char *name) {
    size_t n = strlen(name);
    return name[0] != '.' && n > 4 && strcmp(name + n - 4, ".pem") == 0;
}

/* Loads every *.pem of dir, sorted newest first (repair: see keys_load_file).  Zero keys
 * is not an error here. */
static int keys_load_dir(const char *dir, bool repair, struct keyring **out, struct pep_err *err) {
    struct keyring *k = calloc(1, sizeof *k);
    size_t cap = 0;
    DIR *d = NULL;
    int rc = 0;

    if (!k) return pep_err_set(err, PEP_ENOMEM, "out of memory");
    d = opendir(dir);
    if (!d) {
        rc = pep_err_set(err, PEP_EIO, "%s: %s", dir, strerror(errno));
        goto out;
    }
    for (;;) {
        errno = 0;
        struct dirent *de = readdir(d);
        if (!de) {
            if (errno) rc = pep_err_set(err, PEP_EIO, "%s: %s", dir, strerror(errno));
            break;
        }
        if (!keys_is_key_file_name(de->d_name)) continue;
        char path[PATH_MAX];
        if (snprintf(path, sizeof path, "%s/%s", dir, de->d_name) >= (int)sizeof path) {
            rc = pep_err_set(err, PEP_EINVAL, "%s: path too long", dir);
            break;
        }
        if (k->len == cap) {
            size_t ncap = cap ? 2 * cap : 4;
            struct keys_entry *n = realloc(k->keys, ncap * sizeof *n);
            if (!n) {
                rc = pep_err_set(err, PEP_ENOMEM, "out of memory");
                break;
            }
            k->keys = n;
            cap = ncap;
        }
        struct keys_entry *e = &k->keys[k->len];
        if ((rc = keys_load_file(path, repair, e, err)) != 0) break;
        size_t stem = strlen(de->d_name) - 4;
        if (stem != KEYS_KID_LEN || memcmp(de->d_name, e->kid, KEYS_KID_LEN) != 0)
            fprintf(stderr, "pep: warning: key file %s holds the key with kid %s\n", path, e->kid);
        bool duplicate = false;
        for (size_t i = 0; i < k->len && !duplicate; i++)
            duplicate = strcmp(k->keys[i].kid, e->kid) == 0;
        if (duplicate) {
            fprintf(stderr, "pep: warning: key file %s repeats kid %s; ignored\n", path, e->kid);
            keys_entry_clear(e);
            continue;
        }
        k->len++;
    }
    if (rc == 0 && k->len > 1) qsort(k->keys, k->len, sizeof *k->keys, keys_cmp_newest);
out:
    if (d) closedir(d);
    if (rc) {
        keys_free(k);
        return rc;
    }
    *out = k;
    return 0;
}

/* Makes sure path is a directory, creating it 0700 when missing.  With `private`, a
 * group/world-accessible existing directory is warned about and set to 0700. */
static int keys_ensure_dir(const char *path, bool private, struct pep_err *err) {
    struct stat st;
    if (mkdir(path, 0700) == 0) {
        /* mkdir's mode passes through the umask; make the result exact. */
        if (chmod(path, 0700) != 0)
            return pep_err_set(err, PEP_EIO, "chmod %s: %s", path, strerror(errno));
        return 0;
    }
    if (errno != EEXIST) return pep_err_set(err, PEP_EIO, "mkdir %s: %s", path, strerror(errno));
    if (stat(path, &st) != 0) return pep_err_set(err, PEP_EIO, "%s: %s", path, strerror(errno));
    if (!S_ISDIR(st.st_mode)) return pep_err_set(err, PEP_EIO, "%s: not a directory", path);
    if (private && (st.st_mode & 077)) {
        fprintf(stderr, "pep: warning: key directory %s had mode %04o; setting it to 0700\n", path,
                (unsigned)(st.st_mode & 07777));
        if (chmod(path, 0700) != 0)
            return pep_err_set(err, PEP_EIO, "chmod %s: %s", path, strerror(errno));
    }
    return 0;
}

static int keys_dir_path(const char *data_dir, char out[PATH_MAX], struct pep_err *err) {
    if (!data_dir || !*data_dir) return pep_err_set(err, PEP_EINVAL, "no data directory");
    if (snprintf(out, PATH_MAX, "%s/keys", data_dir) >= PATH_MAX)
        return pep_err_set(err, PEP_EINVAL, "%s: path too long", data_dir);
    int rc = keys_ensure_dir(data_dir, false, err);
    if (rc == 0) rc = keys_ensure_dir(out, true, err);
    return rc;
}

/*
 * Generates a P-256 key and writes it to dir/<kid>.pem (0600, atomic, directory synced).
 * When newer_than is given the file's mtime is set past it if the clock did not already
 * do so, so that the new key is the active one even on coarse-timestamp filesystems.
 */
static int keys_create_file(const char *dir, const struct timespec *newer_than,
                            struct pep_err *err) {
    struct keys_entry e = {0};
    EVP_PKEY *pkey = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    char path[PATH_MAX];
    int rc;

    if (!pkey) return pep_err_set(err, PEP_ECRYPTO, "cannot generate a P-256 key");
    if ((rc = keys_entry_from_pkey(pkey, &e, err)) != 0) {
        EVP_PKEY_free(pkey);
        return rc;
    }
    if (snprintf(path, sizeof path, "%s/%s.pem", dir, e.kid) >= (int)sizeof path) {
        rc = pep_err_set(err, PEP_EINVAL, "%s: path too long", dir);
        goto out;
    }
    if ((rc = pep_write_file_atomic(path, e.private_pem, e.private_pem_len, 0600)) != 0) {
        pep_err_set(err, rc, "cannot write %s: %s", path, strerror(errno));
        goto out;
    }
    if (newer_than) {
        struct stat st;
        if (stat(path, &st) != 0) {
            rc = pep_err_set(err, PEP_EIO, "%s: %s", path, strerror(errno));
            goto out;
        }
        bool newer =
            st.st_mtim.tv_sec > newer_than->tv_sec ||
            (st.st_mtim.tv_sec == newer_than->tv_sec && st.st_mtim.tv_nsec > newer_than->tv_nsec);
        if (!newer) {
            struct timespec t[2] = {{.tv_nsec = UTIME_OMIT}, *newer_than};
            if (++t[1].tv_nsec >= 1000000000L) {
                t[1].tv_sec++;
                t[1].tv_nsec = 0;
            }
            if (utimensat(AT_FDCWD, path, t, 0) != 0) {
                rc = pep_err_set(err, PEP_EIO, "%s: utimensat: %s", path, strerror(errno));
                goto out;
            }
        }
    }
    /* The rename is durable only once the directory entry is. */
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0 || fsync(dfd) != 0) {
        rc = pep_err_set(err, PEP_EIO, "%s: fsync: %s", dir, strerror(errno));
        if (dfd >= 0) close(dfd);
        goto out;
    }
    close(dfd);
    rc = 0;
out:
    keys_entry_clear(&e);
    return rc;
}

int keys_load_or_create(const char *data_dir, struct keyring **out, struct pep_err *err) {
    char dir[PATH_MAX];
    struct keyring *k = NULL;
    int rc;

    *out = NULL;
    if ((rc = keys_dir_path(data_dir, dir, err)) != 0) return rc;
    if ((rc = keys_load_dir(dir, true, &k, err)) != 0) return rc;
    if (k->len == 0) {
        keys_free(k);
        k = NULL;
        if ((rc = keys_create_file(dir, NULL, err)) != 0) return rc;
        /* Read back what is on disk, so the keyring is exactly what a restart loads. */
        if ((rc = keys_load_dir(dir, true, &k, err)) != 0) return rc;
        if (PEP_NEVER(k->len == 0)) {
            keys_free(k);
            return pep_err_set(err, PEP_EIO, "%s: the new key did not load", dir);
        }
    }
    *out = k;
    return 0;
}

int keys_rotate(const char *data_dir, struct keyring **out, struct pep_err *err) {
    char dir[PATH_MAX];
    struct keyring *k = NULL;
    struct timespec newest;
    int rc;

    *out = NULL;
    if ((rc = keys_dir_path(data_dir, dir, err)) != 0) return rc;
    if ((rc = keys_load_dir(dir, true, &k, err)) != 0) return rc;
    bool have = k->len > 0;
    if (have) newest = k->keys[0].mtime;
    keys_free(k);
    k = NULL;
    if ((rc = keys_create_file(dir, have ? &newest : NULL, err)) != 0) return rc;
    if ((rc = keys_load_dir(dir, true, &k, err)) != 0) return rc;
    *out = k;
    return 0;
}

size_t keys_count(const struct keyring *k) {
    return k->len;
}

const char *keys_active_kid(const struct keyring *k) {
    return k->keys[0].kid;
}

const unsigned char *keys_active_private_pem(const struct keyring *k, size_t *len) {
    *len = k->keys[0].private_pem_len;
    return k->keys[0].private_pem;
}

/* The entry named kid, or NULL.  A keyring holds a handful of keys: a linear scan of
 * 44-byte strings is cheaper than any index. */
static const struct keys_entry *keys_find(const struct keyring *k, const char *kid) {
    if (!kid) return NULL;
    for (size_t i = 0; i < k->len; i++) {
        if (strcmp(k->keys[i].kid, kid) == 0) return &k->keys[i];
    }
    return NULL;
}

const unsigned char *keys_public_pem(const struct keyring *k, const char *kid, size_t *len) {
    const struct keys_entry *e = keys_find(k, kid);
    if (!e) return NULL;
    if (len) *len = e->public_pem_len;
    return e->public_pem;
}

EVP_PKEY *keys_public_key(const struct keyring *k, const char *kid) {
    const struct keys_entry *e = keys_find(k, kid);
    return e ? e->public_key : NULL;
}

json_t *keys_jwks(const struct keyring *k) {
    json_t *keys = json_array();
    json_t *set = NULL;
    if (!keys) return NULL;
    for (size_t i = 0; i < k->len; i++) {
        const struct keys_entry *e = &k->keys[i];
        json_t *jwk = json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s}", "kty", "EC", "crv", "P-256",
                                "x", e->x, "y", e->y, "kid", e->kid, "alg", "ES256", "use", "sig");
        if (!jwk || json_array_append_new(keys, jwk) != 0) goto fail;
    }
    set = json_object();
    if (!set) goto fail;
    int rc = json_object_set_new(set, "keys", keys);
    keys = NULL; /* json_object_set_new consumes it, even on failure */
    if (rc != 0) goto fail;
    return set;
fail:
    json_decref(keys);
    json_decref(set);
    return NULL;
}

/*
 * ES256 over input with e's key pair, as a JWS carries it (RFC 7518 3.4): EVP_DigestSign
 * answers a DER ECDSA-Sig-Value, whose INTEGERs drop leading zero bytes (and add one when
 * the top bit is set), so R and S are re-padded to exactly 32 bytes each.  Returns 0 or
 * PEP_ECRYPTO / PEP_ENOMEM.
 */
static int keys_sign_es256(const struct keys_entry *e, const void *input, size_t len,
                           uint8_t out[KEYS_ES256_SIG_LEN]) {
    unsigned char der[KEYS_ES256_DER_MAX];
    size_t der_len = sizeof der;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    ECDSA_SIG *sig = NULL;
    const BIGNUM *r, *s;
    int rc = PEP_ECRYPTO;

    if (!ctx) return PEP_ENOMEM;
    if (EVP_PKEY_get_size(e->pkey) > (int)sizeof der ||
        EVP_DigestSignInit(ctx, NULL, EVP_sha256(), NULL, e->pkey) != 1 ||
        EVP_DigestSign(ctx, der, &der_len, input, len) != 1)
        goto out;
    const unsigned char *p = der;
    sig = d2i_ECDSA_SIG(NULL, &p, (long)der_len);
    if (!sig || p != der + der_len) goto out;
    ECDSA_SIG_get0(sig, &r, &s);
    if (BN_bn2binpad(r, out, KEYS_ES256_SIG_LEN / 2) != KEYS_ES256_SIG_LEN / 2 ||
        BN_bn2binpad(s, out + KEYS_ES256_SIG_LEN / 2, KEYS_ES256_SIG_LEN / 2) !=
            KEYS_ES256_SIG_LEN / 2)
        goto out;
    rc = 0;
out:
    if (rc) ERR_clear_error();
    ECDSA_SIG_free(sig);
    EVP_MD_CTX_free(ctx);
    return rc;
}

/* base64url of a JSON value serialized as libjwt does (compact, sorted keys); malloc'd or
 * NULL. */
static char *keys_json_b64url(const json_t *j) {
    char *text = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS);
    if (!text) return NULL;
    char *b64 = pep_base64url_encode((const uint8_t *)text, strlen(text));
    free(text);
    return b64;
}

int keys_sign_claims(const struct keyring *k, const json_t *claims, char **jwt_out,
                     struct pep_err *err) {
    json_t *header = NULL;
    char *head64 = NULL, *body64 = NULL, *sig64 = NULL, *jwt = NULL;
    uint8_t sig[KEYS_ES256_SIG_LEN];
    int rc;

    *jwt_out = NULL;
    if (!json_is_object(claims))
        return pep_err_set(err, PEP_EINVAL, "claims must be a JSON object");
    const struct keys_entry *active = &k->keys[0];
    header = json_pack("{s:s, s:s, s:s}", "alg", "ES256", "kid", active->kid, "typ", "JWT");
    if (!header || !(head64 = keys_json_b64url(header))) {
        rc = pep_err_set(err, PEP_ENOMEM, "out of memory");
        goto out;
    }
    if (!(body64 = keys_json_b64url(claims))) {
        rc = pep_err_set(err, PEP_EINVAL, "cannot serialize the claims");
        goto out;
    }
    size_t head_len = strlen(head64), body_len = strlen(body64);
    /* "header.payload.signature": 86 base64url characters for the 64-byte signature. */
    size_t cap = head_len + 1 + body_len + 1 + (KEYS_ES256_SIG_LEN * 4 + 2) / 3 + 1;
    jwt = malloc(cap);
    if (!jwt) {
        rc = pep_err_set(err, PEP_ENOMEM, "out of memory");
        goto out;
    }
    memcpy(jwt, head64, head_len);
    jwt[head_len] = '.';
    memcpy(jwt + head_len + 1, body64, body_len);
    size_t signed_len = head_len + 1 + body_len;
    if ((rc = keys_sign_es256(active, jwt, signed_len, sig)) != 0) {
        pep_err_set(err, rc, "cannot sign the JWT");
        goto out;
    }
    if (!(sig64 = pep_base64url_encode(sig, sizeof sig))) {
        rc = pep_err_set(err, PEP_ENOMEM, "out of memory");
        goto out;
    }
    if (PEP_NEVER(signed_len + 1 + strlen(sig64) + 1 > cap)) {
        rc = pep_err_set(err, PEP_ECRYPTO, "signature longer than expected");
        goto out;
    }
    jwt[signed_len] = '.';
    memcpy(jwt + signed_len + 1, sig64, strlen(sig64) + 1);
    *jwt_out = jwt;
    jwt = NULL;
    rc = 0;
out:
    free(jwt);
    free(sig64);
    free(body64);
    free(head64);
    json_decref(header);
    return rc;
}

char *keys_sign_checkpoint(const struct keyring *k, int64_t seq, const uint8_t hash[32],
                           int64_t now_s) {
    char hex[65];
    char *jwt = NULL;
    pep_hex(hash, 32, hex);
    json_t *claims =
        json_pack("{s:I, s:s, s:I}", "seq", (json_int_t)seq, "hash", hex, "iat", (json_int_t)now_s);
    if (!claims) return NULL;
    if (keys_sign_claims(k, claims, &jwt, NULL) != 0) jwt = NULL;
    json_decref(claims);
    return jwt;
}

int keys_load_readonly(const char *dir, struct keyring **out, struct pep_err *err) {
    *out = NULL;
    struct keyring *k = NULL;
    int rc = keys_load_dir(dir, false, &k, err);
    if (rc != 0) return rc;
    if (k->len == 0) {
        keys_free(k);
        return pep_err_set(err, PEP_ENOTFOUND, "%s: no key", dir);
    }
    *out = k;
    return 0;
}
